"""Listings as tables (default), JSON, YAML or CSV, like ``multipass list --format``.

JSON and YAML carry the API's objects whole (stable snake_case keys); tables and CSV carry the
columns people read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

FORMATS = ("table", "json", "yaml", "csv")


class Column:
    """A column of a table: its header, and its cell in a row. Not a dataclass: dataclasses
    imports inspect, which every command would pay for at its start (~10 ms here)."""

    __slots__ = ("header", "value")

    def __init__(self, header: str, value: Callable[[dict[str, Any]], object]) -> None:
        self.header = header
        self.value = value


def render(rows: Sequence[dict[str, Any]], columns: Sequence[Column], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(list(rows), indent=2)
    if fmt == "yaml":
        import yaml  # only here: a table needs none of its import time

        return yaml.safe_dump(list(rows), sort_keys=False).rstrip()
    cells = [[_cell(column.value(row)) for column in columns] for row in rows]
    headers = [column.header for column in columns]
    if fmt == "csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(cells)
        return buffer.getvalue().rstrip("\n")
    if not rows:
        return "No items found."
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *cells]
    )


def render_one(row: dict[str, Any], columns: Sequence[Column], fmt: str) -> str:
    """One object: JSON and YAML give the object itself, not a list of one."""
    if fmt == "json":
        return json.dumps(row, indent=2)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(row, sort_keys=False).rstrip()
    return render([row], columns, fmt)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "--"
    return str(value)
