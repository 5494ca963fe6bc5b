"""The generated gRPC code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

from pathlib import Path

from multiverse.wire.generate import generate

GENERATED = Path(__file__).resolve().parents[1] / "src" / "multiverse" / "wire" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = tmp_path / "multiverse" / "wire" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["multiverse_pb2.py", "multiverse_pb2.pyi", "multiverse_pb2_grpc.py"]
    for name in names:
        assert (GENERATED / name).read_text() == (fresh / name).read_text(), (
            f"{name} is stale: run `make proto`"
        )
