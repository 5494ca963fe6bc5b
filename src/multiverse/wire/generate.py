"""Regenerates the gRPC code in ``wire/v1`` from ``proto/``: ``python -m multiverse.wire.generate``.

The generated files are committed so that installing Multiverse needs no protoc; a test runs
this into a temporary directory and compares, so they never drift from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
PROTO_FILES = ["multiverse/wire/v1/multiverse.proto"]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    generate(out)
    print(f"generated {', '.join(PROTO_FILES)} into {out}")


if __name__ == "__main__":
    main()
