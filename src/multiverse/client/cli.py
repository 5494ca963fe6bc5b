"""What the client's commands share: their client, options, output and waits.

The commands themselves live in modules named after what they act on (instances, nodes,
faults, tokens, images, environments; multiverse.servers for the ones that run a master or a
worker), and ``multiverse.main`` names where each is: a call imports its own command's module
only.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from multiverse.client import cmdline
from multiverse.client.errors import ApiError, Failure
from multiverse.client.output import FORMATS
from multiverse.core.errors import MultiverseError
from multiverse.core.sizes import format_size

if TYPE_CHECKING:
    from rich.console import Console

    from multiverse.client.http import ApiClient

# Imported where a command needs them, not here: rich, websockets, asyncio, the HTTP client and
# TLS together cost several times what the rest of a call's start does (`python -X importtime
# -m multiverse --version` shows it), and most commands need one or two of them. So are the
# model's and the network's parsers (their dataclasses, enums and regexes): only the options
# that parse with them load them.


@functools.cache
def stderr_console() -> Console:
    """rich's Console on stderr, made on first use (a spinner, an error)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # long messages stay on one line for grep


class _LazyConsole:
    """Stands for :func:`stderr_console` until something is asked of it. Where rich wants
    a Console itself (``Live(console=...)``), pass ``stderr_console()``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(stderr_console(), name)


stderr = cast("Console", _LazyConsole())


def debug(message: str) -> None:
    """Which way a call went, for ``MULTIVERSE_DEBUG=1``: shown on stderr, else nothing."""
    if os.environ.get("MULTIVERSE_DEBUG"):
        sys.stderr.write(f"debug: {message}\n")


def api_client() -> ApiClient:
    from multiverse.client.config import ClientConfig
    from multiverse.client.http import ApiClient

    try:
        config = ClientConfig.load()
    except ValueError as exc:
        raise cmdline.UsageError(str(exc)) from exc
    if not config.server:
        raise cmdline.UsageError(
            f"no master configured ({config.source} not found): start one with `multiverse up`, "
            "or set MULTIVERSE_SERVER and MULTIVERSE_TOKEN"
        )
    return ApiClient(config.server, config.token, verify=config.ssl_context())


format_option = cmdline.option(
    "--format",
    "fmt",
    type=cmdline.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)


def ago(stamp: str | None) -> str:
    if not stamp:
        return "never"
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


label_filter = cmdline.option(
    "--labels", "label", default="", help="Only those with these labels: k=v,..."
)


T = TypeVar("T")


def parsed(
    parse: Callable[[str], T],
) -> Callable[[cmdline.Context, cmdline.Parameter, str | None], T | None]:
    """A click callback that runs ``parse`` on an option's text: our validation errors become
    usage errors (exit code 1) naming the option."""

    def callback(_ctx: cmdline.Context, _param: cmdline.Parameter, value: str | None) -> T | None:
        if value is None:
            return None
        try:
            return parse(value)
        except MultiverseError as exc:
            raise cmdline.BadParameter(exc.message) from exc

    return callback


def _labels(text: str) -> dict[str, str]:
    from multiverse.core.model import parse_labels

    return parse_labels(text)


labels_option = parsed(_labels)


@contextmanager
def _spinner(text: str) -> Iterator[Callable[[str], None]]:
    if not sys.stderr.isatty():  # nobody would see it: spare scripts the import of rich
        yield lambda state: None
        return
    with stderr.status(text) as status:
        yield lambda state: status.update(f"{text}: {state}")


def wait_for(
    client: ApiClient, operation_id: str, timeout: float, label: str, instance: str = ""
) -> dict[str, Any]:
    """Wait for an operation, showing the instance's state (if one is named) meanwhile.

    Returns the operation once it succeeded; raises Failure with its error otherwise.
    """
    deadline = time.monotonic() + timeout
    shown = 0
    with _spinner(label) as show:
        while True:
            operation = client.wait_operation(operation_id, timeout=1)
            for line in operation.get("progress", [])[shown:]:
                stderr.print(line, markup=False, highlight=False)
                shown += 1
            if operation["status"] == "success":
                return operation
            if operation["status"] == "failure":
                raise Failure(operation["error"] or f"{label} failed")
            if time.monotonic() > deadline:
                raise Failure(f"{label}: still not done after {timeout:.0f}s")
            progress = operation.get("transfer")
            if figures := operation.get("figures"):
                show(_move_progress(figures))
            elif instance:
                try:
                    item = client.instance(instance)
                except ApiError:
                    show("gone")
                    continue
                pulling = item["state"] == "Creating" and item["message"]
                show(f"{item['state']} ({item['message']})" if pulling else item["state"])
            elif progress and progress["stage"]:
                show(progress["stage"])


def _move_progress(progress: dict[str, Any]) -> str:
    """A move's phase and the disk bytes sent so far."""
    total = progress.get("disk_bytes_total") or 0
    sent = progress.get("disk_bytes_sent") or 0
    figures = f" {format_size(sent)}/{format_size(total)}" if total else ""
    return f"{progress.get('phase', '')}{figures}"


wait_options = [
    cmdline.option("--no-wait", is_flag=True, help="Return at once instead of waiting."),
    cmdline.option(
        "--timeout",
        type=cmdline.FloatRange(1),
        default=600,
        show_default=True,
        help="Seconds to wait.",
    ),
]


def with_wait(func: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(wait_options):
        func = option(func)
    return func


def seconds_option(
    _ctx: cmdline.Context, _param: cmdline.Parameter, value: str | None
) -> int | None:
    """A click callback: a duration's text (30m, 1h, 7d, or plain seconds) in seconds."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = value[:-1], value[-1:]
    if unit.isdigit():
        number, unit = value, "s"
    if not number.isdigit() or unit not in units or int(number) == 0:
        raise cmdline.BadParameter(f"invalid duration {value!r}: use e.g. 30m, 1h, 7d")
    return int(number) * units[unit]
