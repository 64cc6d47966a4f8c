"""Where the examples connect, and with which token: the SWITCHBOARD_* environment.

Importing this module puts the generated stubs (gen/, made by `python gen.py`) on
sys.path, so that `from switchboard.limiter.v1 import limiter_pb2` works.
"""

import os
import sys
from pathlib import Path

import grpc

GEN = Path(__file__).resolve().parent / "gen"
if not (GEN / "switchboard").is_dir():
    sys.exit(f"no generated stubs in {GEN}: run `python gen.py` in examples/python first")
sys.path.insert(0, str(GEN))

# The ports scripts/stack (and each service's --listen default) uses.
PRESENCE = ("SWITCHBOARD_PRESENCE", "127.0.0.1:50051")
LIMITER = ("SWITCHBOARD_LIMITER", "127.0.0.1:50052")
ROUTER = ("SWITCHBOARD_ROUTER", "127.0.0.1:50053")


def address(service: tuple[str, str]) -> str:
    """The address of `service` (one of PRESENCE, LIMITER, ROUTER): its variable or default."""
    variable, default = service
    return os.environ.get(variable) or default


def auth() -> tuple[tuple[str, str], ...]:
    """The call metadata carrying SWITCHBOARD_TOKEN, as every Switchboard RPC wants it:
    `authorization: Bearer <JWT>` (health and reflection need none)."""
    token = os.environ.get("SWITCHBOARD_TOKEN")
    if not token:
        sys.exit(
            "SWITCHBOARD_TOKEN is not set: export a token (with scripts/stack running, "
            "`. .stack/env && export SWITCHBOARD_TOKEN=$DEMO_TOKEN`)"
        )
    return (("authorization", f"Bearer {token}"),)


def channel(target: str) -> grpc.Channel:
    """A plain-text channel to `target` (the stack serves no TLS)."""
    return grpc.insecure_channel(target)
