"""Domain rules: sizes, names, labels, specs."""

from __future__ import annotations

import pytest

from multiverse.core.errors import InvalidArgument
from multiverse.core.model import InstanceSpec, Resources, parse_labels, validate_name
from multiverse.core.sizes import GiB, MiB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * MiB),
        ("1G", GiB),
        ("1.5G", GiB * 3 // 2),
        ("2GiB", 2 * GiB),
        ("100", 100),
        ("4g", 4 * GiB),
        ("2KB", 2048),
        ("1P", 1024**5),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1G", "1X", "G", "1..2G", -5])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_the_size_message_tells_what_is_accepted() -> None:
    """Every suffix it names works, and it says that they are binary."""
    with pytest.raises(InvalidArgument) as refused:
        parse_size("lots")
    message = refused.value.message
    for suffix in ("K", "M", "G", "T", "P"):
        assert f" {suffix}" in message or f"{suffix} " in message
        assert parse_size(f"1{suffix}") == 1024 ** ("KMGTP".index(suffix) + 1)
    assert "1024^3" in message


def test_format_size() -> None:
    assert format_size(int(1.3 * GiB)) == "1.3GiB"
    assert format_size(512) == "512B"


@pytest.mark.parametrize("name", ["a", "web-1", "A1b2", "x" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "1web", "-web", "web-", "we_b", "x" * 64, "wéb"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_name(name)


def test_spec_bounds() -> None:
    InstanceSpec(name="ok").validate()
    for bad in (
        InstanceSpec(name="a", cpus=0),
        InstanceSpec(name="a", memory=2**60),
        InstanceSpec(name="a", disk=1),
        InstanceSpec(name="a", image="../etc"),
    ):
        with pytest.raises(InvalidArgument):
            bad.validate()


def test_labels_and_capacity() -> None:
    assert parse_labels("zone=a, disk=ssd") == {"zone": "a", "disk": "ssd"}
    with pytest.raises(InvalidArgument):
        parse_labels("zone")
    assert Resources.parse("cpus=8,memory=16G,disk=100G") == Resources(8, 16 * GiB, 100 * GiB)
    for bad in ("cpus=8", "cpus=x,memory=1G,disk=1G", "cpus=0,memory=1G,disk=1G", "gpus=1"):
        with pytest.raises(InvalidArgument):
            Resources.parse(bad)
