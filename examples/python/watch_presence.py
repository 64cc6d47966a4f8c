#!/usr/bin/env python3
"""Prints presence changes (devices joining, changing, leaving) and resumes after a break.

    SWITCHBOARD_TOKEN=... python watch_presence.py [IDENTITY ...] [--account A] [--from-revision N]

The token needs the scope `presence.read`. SWITCHBOARD_PRESENCE may name several replicas
(comma-separated): when the stream breaks the watcher moves to the next one.

WatchPresence (proto/switchboard/presence/v1/presence.proto) stamps every event with the
etcd revision of the change and never skips a change after its start point, so a watcher
that remembers the last revision it saw loses nothing across a break:
- the first watch asks for a snapshot (the devices present now, as `joined`, then
  `snapshot_complete`), unless --from-revision says where to start;
- when the stream breaks (UNAVAILABLE when the replica stops, or the connection drops) it
  reconnects with backoff and resumes from the last revision seen;
- when that revision has been compacted the server sends `compacted` and ends the stream
  with OUT_OF_RANGE: changes were lost, so it takes a new snapshot.

Each line starts with a fixed word: watch, resume, joined, updated, left,
snapshot_complete, compacted, disconnected, error. Ctrl-C stops it (exit 0); a refused
token or request exits 1.
"""

import argparse
import os
import sys
import time

import grpc

import connection
from switchboard.presence.v1 import presence_pb2 as pb
from switchboard.presence.v1 import presence_pb2_grpc

INITIAL_BACKOFF_MS = 250
MAX_BACKOFF_MS = 5000
# Retrying cannot help these: the token or the request is wrong.
FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


class Position:
    """Where the next watch starts: a snapshot (0), or a revision.

    After a change it is the revision of the last change seen, not the one after: one
    revision can carry several events (one etcd transaction changes several devices), and a
    stream that broke between two of them must deliver the rest; the events of that
    revision already printed are remembered and skipped. After a snapshot it is the
    snapshot's revision + 1, since the snapshot already shows every change up to it."""

    def __init__(self, from_revision: int):
        self.start = from_revision
        self.seen = set()  # events already printed at revision self.start
        self.in_snapshot = False

    def request(self, account: str, identities: list[str]) -> pb.WatchPresenceRequest:
        request = pb.WatchPresenceRequest(account_id=account, identities=identities)
        if self.start > 0:
            request.start_revision = self.start
        else:
            request.snapshot = True
        self.in_snapshot = request.snapshot
        return request

    def is_new(self, event: pb.WatchPresenceResponse) -> bool:
        """Records `event`; False when it was already printed before a break."""
        kind = event.WhichOneof("event")
        if self.in_snapshot:
            # Snapshot events all carry the snapshot's revision; it counts only once the
            # snapshot is complete (a snapshot cut short is taken again).
            if kind == "snapshot_complete":
                self.in_snapshot = False
                self.start, self.seen = event.revision + 1, set()
            return True
        if kind == "compacted":
            self.start, self.seen = 0, set()
            return True
        device = getattr(event, kind).device
        key = (kind, device.identity, device.device_id)
        if event.revision > self.start:
            self.start, self.seen = event.revision, set()
        elif event.revision < self.start or key in self.seen:
            return False
        self.seen.add(key)
        return True


def label(enum, value: int, prefix: str) -> str:
    """An enum value's name without its prefix, in lower case: STATUS_AVAILABLE -> available."""
    return enum.Name(value).removeprefix(prefix).lower()


def describe(event: pb.WatchPresenceResponse) -> str:
    kind = event.WhichOneof("event")
    if kind == "snapshot_complete":
        return f"snapshot_complete revision={event.revision}"
    if kind == "compacted":
        compacted = event.compacted.compact_revision
        return f"compacted compact_revision={compacted} (changes were lost: taking a new snapshot)"
    change = getattr(event, kind)
    device = change.device
    status = label(pb.Status, device.status, "STATUS_")
    connection_kind = label(pb.ConnectionKind, device.connection_kind, "CONNECTION_KIND_")
    line = (
        f"{kind} revision={event.revision} device={device.identity}/{device.device_id} "
        f"status={status} kind={connection_kind}"
    )
    if kind == "left":
        line += f" reason={label(pb.LeaveReason, change.reason, 'LEAVE_REASON_')}"
    return line


def watch_once(address, request, auth, position) -> grpc.StatusCode:
    """One WatchPresence stream on its own channel, printed until it ends; how it ended."""
    channel = connection.channel(address)
    try:
        stub = presence_pb2_grpc.PresenceServiceStub(channel)
        for event in stub.WatchPresence(request, metadata=auth):
            if position.is_new(event):
                print(describe(event), flush=True)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        if err.code() in FATAL:
            print(
                f"error address={address} code={err.code().name} message={err.details()}",
                flush=True,
            )
        return err.code()
    finally:
        channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("identities", nargs="*", help="identities to watch (default: all)")
    parser.add_argument(
        "--account",
        default=os.environ.get("SWITCHBOARD_ACCOUNT", ""),
        help="account (default: SWITCHBOARD_ACCOUNT, else the token's)",
    )
    parser.add_argument(
        "--from-revision",
        type=int,
        default=0,
        help="deliver every change from this revision on, instead of a snapshot",
    )
    args = parser.parse_args()

    addresses = [a.strip() for a in connection.address(connection.PRESENCE).split(",") if a.strip()]
    auth = connection.auth()
    position = Position(args.from_revision)
    backoff_ms, attempt = INITIAL_BACKOFF_MS, 0
    while True:
        address = addresses[attempt % len(addresses)]
        request = position.request(args.account, args.identities)
        if request.snapshot:
            print(f"watch address={address} snapshot=true", flush=True)
        else:
            print(f"resume address={address} start_revision={request.start_revision}", flush=True)
        seen_before = (position.start, len(position.seen))
        code = watch_once(address, request, auth, position)
        if code in FATAL:
            return 1
        if (position.start, len(position.seen)) != seen_before:
            backoff_ms = INITIAL_BACKOFF_MS  # the stream worked: start the backoff over
        attempt += 1
        next_address = addresses[attempt % len(addresses)]
        if code == grpc.StatusCode.OUT_OF_RANGE:
            position.start = 0  # compacted: only a new snapshot can catch up
            backoff_ms = 0
        print(
            f"disconnected address={address} code={code.name} retry_in={backoff_ms}ms next={next_address}",
            flush=True,
        )
        time.sleep(backoff_ms / 1000)
        backoff_ms = min(max(backoff_ms * 2, INITIAL_BACKOFF_MS), MAX_BACKOFF_MS)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
