#!/usr/bin/env python3
"""Generates the Python stubs of Switchboard's contract (../../proto) into gen/.

    python gen.py

Run it again whenever the .proto files change; gen/ is rebuilt from scratch each time and
is not committed. The examples import the stubs as `switchboard.<service>.v1.<file>_pb2`
and `..._pb2_grpc` (connection.py puts gen/ on sys.path).
"""

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
OUT = HERE / "gen"


def main() -> int:
    files = sorted(str(path) for path in PROTO.glob("switchboard/*/v1/*.proto"))
    if not files:
        print(f"no .proto files under {PROTO}", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    # grpcio-tools ships google/protobuf/*.proto (Timestamp); protoc needs them on the path.
    well_known = resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO}",
            f"--proto_path={well_known}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            *files,
        ]
    )
    if status != 0:
        print(f"protoc failed (exit {status})", file=sys.stderr)
        return 1
    print(f"generated stubs of {len(files)} .proto files into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
