"""``multiverse apply -f``, ``diff -f``, ``envs``, ``get env``: environments from one file.

The file is read and checked here (core/environment.py gives every problem its line and
column, before anything is sent); ``cloud-init: FILE`` is read relative to the file. The master
gets the file's JSON form and does the rest (``PUT /api/v1/environments/{name}``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multiverse.client import cmdline
from multiverse.client.cli import api_client, format_option, stderr_console, with_wait
from multiverse.client.errors import Failure
from multiverse.client.instances import INSTANCE_COLUMNS
from multiverse.client.output import Column, render, render_one
from multiverse.core.errors import MultiverseError

if TYPE_CHECKING:  # rich, the HTTP client and the fault model: loaded by the commands using them
    from rich.table import Table

    from multiverse.client.http import ApiClient
    from multiverse.core.environment import EnvironmentSpec
    from multiverse.core.faults import ScheduledFault

__all__ = ["apply", "diff", "envs", "get"]

file_option = cmdline.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=cmdline.Path(exists=True, dir_okay=False),
    help="The environment file (YAML).",
)
prune_option = cmdline.option(
    "--prune", is_flag=True, help="Delete the environment's instances the file no longer lists."
)
recreate_option = cmdline.option(
    "--recreate",
    is_flag=True,
    help="Delete and re-create instances whose size, image or cloud-init changed.",
)

SYMBOLS = {"create": "+", "recreate": "-/+", "delete": "-", "start": "~", "stop": "~"}


def read_environment(path: Path) -> EnvironmentSpec:
    """An environment file (`apply -f`), checked; a problem names its line and column."""
    from multiverse.core.environment import parse_yaml  # yaml and jinja2: only for this

    def read(name: str) -> str:
        return (path.parent / name).read_text()  # cloud-init: FILE, beside the file

    try:
        return parse_yaml(path.read_text(), str(path), read)
    except MultiverseError as exc:
        raise cmdline.CommandError(exc.message) from exc


def _show_plan(answer: dict[str, Any]) -> None:
    for action in answer["actions"]:
        detail = f" ({action['detail']})" if action["detail"] else ""
        cmdline.echo(f"{SYMBOLS[action['action']]} {action['action']} {action['name']}{detail}")
    if answer["kept"]:
        cmdline.echo(f"  kept, not in the file (--prune deletes them): {', '.join(answer['kept'])}")
    if not answer["actions"]:
        cmdline.echo(f"environment {answer['name']}: nothing to do")


@cmdline.command()
@file_option
@prune_option
@recreate_option
def diff(path: Path, prune: bool, recreate: bool) -> None:
    """Show what `apply -f FILE` would do, changing nothing."""
    spec = read_environment(path)
    answer = api_client().apply_environment(
        spec.document, prune=prune, recreate=recreate, dry_run=True
    )
    _show_plan(answer)


@cmdline.command()
@file_option
@prune_option
@recreate_option
@with_wait
def apply(path: Path, prune: bool, recreate: bool, no_wait: bool, timeout: float) -> None:
    """Create or change an environment as FILE describes; waits until all of it is Running.

    Creates what is missing, starts and stops what the file says, refuses size, image or
    cloud-init changes unless --recreate, and deletes what the file no longer lists only with
    --prune. A second apply of the same file does nothing.
    """
    spec = read_environment(path)
    client = api_client()
    answer = client.apply_environment(spec.document, prune=prune, recreate=recreate)
    _show_plan(answer)
    if no_wait:
        cmdline.echo(answer["operation"])
        return
    names = [member.name for member in spec.members]
    _follow(client, answer["operation"], spec.name, names, timeout)
    cmdline.echo(f"environment {spec.name}: {len(names)} instances as the file says")
    if spec.faults:
        _run_schedule(client, spec.faults)


def _run_schedule(client: ApiClient, schedule: tuple[ScheduledFault, ...]) -> None:
    """The file's faults, each at its time from now, as a timeline; returns when those with
    a duration have healed (the others stay, as `fault list` shows)."""
    started = time.monotonic()

    def stamp() -> str:
        return f"+{time.monotonic() - started:6.1f}s"

    timed: set[str] = set()
    for item in schedule:
        time.sleep(max(0.0, started + item.at - time.monotonic()))
        fault = client.add_fault(dict(item.body))
        cmdline.echo(f"{stamp()} fault {fault['id']} applied: {item.describe()}")
        if item.body.get("duration"):
            timed.add(str(fault["id"]))
        else:
            cmdline.echo(
                f"{'':8} (no duration: heal it with `multiverse fault heal {fault['id']}`)"
            )
    while timed:
        in_force = {str(f["id"]) for f in client.faults()}
        for fault_id in sorted(timed - in_force):
            cmdline.echo(f"{stamp()} fault {fault_id} healed")
        timed &= in_force
        if timed:
            time.sleep(0.5)


def _follow(
    client: ApiClient, operation_id: str, env: str, names: list[str], timeout: float
) -> None:
    """Wait for the apply, showing each instance's state (a live table on a terminal)."""
    from rich.live import Live

    deadline = time.monotonic() + timeout
    with Live(_progress({}, names), console=stderr_console(), transient=True) as live:
        while True:
            operation = client.wait_operation(operation_id, timeout=1)
            if operation["status"] == "success":
                return
            if operation["status"] == "failure":
                raise Failure(operation["error"] or f"apply of {env} failed")
            if time.monotonic() > deadline:
                raise Failure(f"apply of {env}: still not done after {timeout:.0f}s")
            seen = {item["name"]: item for item in client.instances(env=env)}
            live.update(_progress(seen, names))


def _progress(seen: dict[str, dict[str, Any]], names: list[str]) -> Table:
    from rich.table import Table

    table = Table("Instance", "State", "Node", "IPv4", box=None)
    for name in names:
        item = seen.get(name, {})
        table.add_row(name, item.get("state", "waiting"), item.get("node", ""), item.get("ipv4"))
    return table


ENV_COLUMNS = [
    Column("Environment", lambda e: e["name"]),
    Column("Instances", lambda e: ",".join(i["name"] for i in e["instances"])),
    Column("Running", lambda e: f"{e['running']}/{len(e['instances'])}"),
]


@cmdline.command()
@format_option
def envs(fmt: str) -> None:
    """List environments (instances made by `apply`) with their instances."""
    cmdline.echo(render(api_client().environments(), ENV_COLUMNS, fmt))


@cmdline.group()
def get() -> None:
    """Show one object, as kubectl get."""


@get.command(name="env")
@cmdline.argument("name")
@format_option
def get_env(name: str, fmt: str) -> None:
    """An environment's instances."""
    environment = api_client().environment(name)
    if fmt in ("json", "yaml"):
        cmdline.echo(render_one(environment, ENV_COLUMNS, fmt))
    else:
        cmdline.echo(render(environment["instances"], INSTANCE_COLUMNS, fmt))
