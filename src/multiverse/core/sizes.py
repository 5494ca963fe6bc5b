"""Sizes as people write them (``512M``, ``4G``) and as bytes.

Suffixes are binary, as in Multipass: ``1G`` is 1024**3 bytes. (pydantic's ``ByteSize`` reads
``1G`` as 10**9, so it is not used: the same text must mean the same size here as there.)
"""

from __future__ import annotations

import re

from multiverse.core.errors import InvalidArgument

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


def parse_size(text: str | int) -> int:
    """Bytes from ``"4G"``, ``"512MiB"``, ``"1.5G"`` or a plain number of bytes."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    match = _SIZE.match(text)
    if not match:
        raise InvalidArgument(
            f"invalid size {text!r}: use a number of bytes, or one with a K, M, G, T or P "
            "suffix (binary: 1G is 1024^3 bytes; KiB/KB and the like mean the same), e.g. 4G"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(size: int) -> str:
    """The short human form used in tables: ``1.3GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
