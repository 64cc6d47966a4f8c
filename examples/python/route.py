#!/usr/bin/env python3
"""Routes an incoming communication and prints how it went: state, outcome, legs, timeline.

    SWITCHBOARD_TOKEN=... python route.py [--from +15551234] [--to +15550100] [--param k=v ...]

The token needs the scope `router.route`. Route returns once the communication is
connected or routing has ended (the stack's application for +15550100 dials alice, whose
softphone answers after 2 seconds). Exit status: 0 routed (whatever the outcome), 2 the
call failed (e.g. NOT_FOUND: no application for --to).
"""

import argparse
import os
import sys

import grpc

import connection
from switchboard.router.v1 import router_pb2 as pb
from switchboard.router.v1 import router_pb2_grpc


def name(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--account",
        default=os.environ.get("SWITCHBOARD_ACCOUNT", ""),
        help="account (default: SWITCHBOARD_ACCOUNT, else the token's)",
    )
    parser.add_argument("--from", dest="caller", default="+15551234")
    parser.add_argument("--to", default="+15550100")
    parser.add_argument("--channel", default="voice")
    parser.add_argument("--id", default="", help="communication id (default: the router's)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="a parameter for the offered devices (repeatable)",
    )
    args = parser.parse_args()

    request = pb.RouteRequest(
        account_id=args.account,
        to=args.to,
        channel=args.channel,
        communication_id=args.id,
        parameters=dict(p.split("=", 1) for p in args.param),
    )
    setattr(request, "from", args.caller)  # `from` is a Python keyword
    target = connection.address(connection.ROUTER)
    router = router_pb2_grpc.RouterServiceStub(connection.channel(target))
    try:
        # Route waits for the Dial timeouts by contract; bound it generously.
        answer = router.Route(request, metadata=connection.auth(), timeout=120)
    except grpc.RpcError as err:
        print(
            f"error address={target} code={err.code().name} message={err.details()}",
            file=sys.stderr,
        )
        return 2
    c = answer.communication
    connected = f"{c.connected_identity}/{c.connected_device_id}" if c.connected_identity else "-"
    state = name(pb.CommunicationState, c.state, "COMMUNICATION_STATE_")
    outcome = name(pb.Outcome, c.outcome, "OUTCOME_")
    print(
        f"communication {c.communication_id} state={state} outcome={outcome} connected={connected}"
    )
    for leg in c.legs:
        leg_state = name(pb.LegState, leg.state, "LEG_STATE_")
        reason = name(pb.LegEndReason, leg.end_reason, "LEG_END_REASON_") if leg.end_reason else "-"
        print(f"  leg {leg.leg_id} {leg.identity}/{leg.device_id} {leg_state} end_reason={reason}")
    created = c.create_time.ToMilliseconds()
    for event in c.timeline:
        offset = event.time.ToMilliseconds() - created
        kind = name(pb.TimelineEventKind, event.kind, "TIMELINE_EVENT_KIND_")
        print(f"  {event.sequence:2} +{offset:5}ms {kind:13} {event.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
