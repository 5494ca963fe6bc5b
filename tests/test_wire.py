"""The generated gRPC code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import re
from pathlib import Path

from multiverse.wire.generate import generate

GENERATED = Path(__file__).resolve().parents[1] / "src" / "multiverse" / "wire" / "v1"

# The generator's own version, stamped into what it writes. grpcio-tools is not pinned, so a
# fresh machine may get a newer patch release than the one that generated the committed code;
# that is not staleness (the code is the same), and the committed stamp, the older one, asks
# the least of the grpcio and protobuf a user has.
_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE),
    re.compile(r"^# Protobuf Python Version: \S+$", re.MULTILINE),
    re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n"),
)


def _unstamped(text: str) -> str:
    for stamp in _STAMPS:
        text = stamp.sub(lambda match: match.group(1) if match.groups() else "", text)
    return text


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = tmp_path / "multiverse" / "wire" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["multiverse_pb2.py", "multiverse_pb2.pyi", "multiverse_pb2_grpc.py"]
    for name in names:
        committed, regenerated = (GENERATED / name).read_text(), (fresh / name).read_text()
        assert _unstamped(committed) == _unstamped(regenerated), (
            f"{name} is stale: run `make proto`"
        )


def test_only_the_generators_version_stamps_are_overlooked() -> None:
    committed = (GENERATED / "multiverse_pb2_grpc.py").read_text()
    restamped = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.9.9'",
                       committed)  # fmt: skip
    assert restamped != committed and _unstamped(restamped) == _unstamped(committed)
    pb2 = (GENERATED / "multiverse_pb2.py").read_text()
    assert "ValidateProtobufRuntimeVersion" in pb2 and "Protobuf Python Version" in pb2
    assert "Protobuf Python Version" not in _unstamped(pb2)
    assert "Domain.PUBLIC,\n    ''," in _unstamped(pb2)  # the three numbers gone, nothing else
    changed = committed.replace("IssueSessionTicket", "IssueSessionTickets", 1)
    assert _unstamped(changed) != _unstamped(committed)  # a real change still shows
