#!/usr/bin/env python3
"""Acquires a concurrency slot of the limiter, does the work, and always releases it.

    SWITCHBOARD_TOKEN=... python acquire_release.py [--account A] [--resource R] [--fail]

The token needs the scope `limiter.acquire`; its account is used unless --account (or
SWITCHBOARD_ACCOUNT) names it. --fail raises inside the `with` block, to show that the
slot is released on exceptions too. Exit status: 0 done, 1 over the limit or the work
failed, 2 a call failed.
"""

import argparse
import os
import sys
import time
import uuid
from contextlib import contextmanager

import grpc

import connection
from switchboard.limiter.v1 import limiter_pb2 as pb
from switchboard.limiter.v1 import limiter_pb2_grpc


class OverLimit(Exception):
    """The key is at its limit: the limiter's decision was DECISION_REJECTED."""

    def __init__(self, answer: pb.AcquireResponse):
        super().__init__(
            f"rejected in_flight={answer.in_flight} limit={answer.limit} "
            f"retry_after_ms={answer.retry_after_ms}"
        )


@contextmanager
def slot(limiter, account, resource, hold_seconds=60, wait_ms=0):
    """Holds one slot of (account, resource) for the `with` block, and releases it when the
    block ends, however it ends. A holder that dies without releasing frees its slot when
    hold_seconds run out."""
    auth = connection.auth()
    request = pb.AcquireRequest(
        account_id=account,
        resource=resource,
        hold_seconds=hold_seconds,
        wait_timeout_ms=wait_ms,
        # An Acquire retried with the same request_id gets the same slot, not a second one.
        request_id=str(uuid.uuid4()),
    )
    granted = limiter.Acquire(request, metadata=auth, timeout=10 + wait_ms / 1000)
    if granted.decision != pb.DECISION_GRANTED:
        raise OverLimit(granted)
    try:
        yield granted
    finally:
        answer = limiter.Release(
            pb.ReleaseRequest(slot_id=granted.slot_id), metadata=auth, timeout=10
        )
        print(
            f"released slot={granted.slot_id} released={str(answer.released).lower()}", flush=True
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--account",
        default=os.environ.get("SWITCHBOARD_ACCOUNT", ""),
        help="account (default: SWITCHBOARD_ACCOUNT, else the token's)",
    )
    parser.add_argument(
        "--resource",
        default=os.environ.get("SWITCHBOARD_RESOURCE", "reports"),
        help="resource (default: SWITCHBOARD_RESOURCE, else reports)",
    )
    parser.add_argument("--hold-seconds", type=int, default=60)
    parser.add_argument("--wait-ms", type=int, default=0, help="queue this long when at the limit")
    parser.add_argument("--work-ms", type=int, default=100, help="how long the work takes")
    parser.add_argument("--fail", action="store_true", help="make the work raise")
    args = parser.parse_args()

    target = connection.address(connection.LIMITER)
    limiter = limiter_pb2_grpc.LimiterServiceStub(connection.channel(target))
    try:
        with slot(limiter, args.account, args.resource, args.hold_seconds, args.wait_ms) as s:
            print(
                f"granted slot={s.slot_id} fencing_token={s.fencing_token} "
                f"in_flight={s.in_flight}/{s.limit} resource={args.resource} "
                f"expires={s.expire_time.ToJsonString()}",
                flush=True,
            )
            time.sleep(args.work_ms / 1000)
            if args.fail:
                raise RuntimeError("the work failed (--fail)")
    except OverLimit as err:
        print(err, flush=True)
        return 1
    except RuntimeError as err:
        print(f"failed: {err}", flush=True)
        return 1
    except grpc.RpcError as err:
        print(
            f"error address={target} code={err.code().name} message={err.details()}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
