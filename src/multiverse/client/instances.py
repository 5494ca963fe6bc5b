"""Commands on instances: ``launch``, ``list``, ``info``, ``start``, ``stop``, ``restart``,
``delete``, ``shell``, ``exec``, ``logs``, ``move``, ``events``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multiverse.client import cmdline
from multiverse.client.cli import (
    api_client,
    format_option,
    label_filter,
    labels_option,
    parsed,
    stderr,
    wait_for,
    with_wait,
)
from multiverse.client.errors import EXIT_FAILED, ApiError, Failure
from multiverse.client.output import Column, render
from multiverse.core.errors import MultiverseError
from multiverse.core.sizes import format_size, parse_size

if TYPE_CHECKING:
    from multiverse.client.http import ApiClient


INSTANCE_COLUMNS = [
    Column("Node Name", lambda i: i["node"]),
    Column("Instance Name", lambda i: i["name"]),
    Column("State", lambda i: i["state"]),
    Column("IPv4", lambda i: i["ipv4"]),
    Column("Image", lambda i: i["image"]),
]


def _usage(item: dict[str, Any] | None) -> str:
    if not item:
        return "--"
    return f"{format_size(item['used'])} out of {format_size(item['total'])}"


INFO_COLUMNS = [
    Column("Node Name", lambda i: i["node"]),
    Column("Instance Name", lambda i: i["name"]),
    Column("State", lambda i: i["state"]),
    Column("Cpu", lambda i: i["cpus"]),
    Column("Load", lambda i: " ".join(f"{x:.2f}" for x in i["load"]) if i["load"] else "--"),
    Column("Disk", lambda i: _usage(i["disk_usage"])),
    Column("Memory", lambda i: _usage(i["memory_usage"])),
    Column("Release", lambda i: i["release"]),
    Column("Restarts", lambda i: i["restarts"]),
    Column("Published", lambda i: ",".join(i.get("publish", [])) or "--"),
]


@cmdline.command(name="instances")
@cmdline.option("--node", default="", help="Only those on this node.")
@cmdline.option("--state", default="", help="Only those in this state (Running, Stopped...).")
@label_filter
@cmdline.option("--env", help="Only the instances of this environment (see `apply`).")
@format_option
def instances_(node: str, state: str, label: str, env: str | None, fmt: str) -> None:
    """List instances (aliases: list, ls)."""
    listed = api_client().instances(node=node, state=state, label=label, env=env)
    cmdline.echo(render(listed, INSTANCE_COLUMNS, fmt))


@cmdline.command()
@cmdline.argument("names", nargs=-1)
@cmdline.option("--all", "all_", is_flag=True, help="All instances (the default with no NAME).")
@format_option
def info(names: tuple[str, ...], all_: bool, fmt: str) -> None:
    """Show load, memory and disk from inside instances."""
    found = api_client().info(list(names) if names and not all_ else None)
    cmdline.echo(render(found, INFO_COLUMNS, fmt))


_size = parsed(parse_size)


def _publish(text: str) -> str:
    from multiverse.core.network import parse_publish

    try:
        return str(parse_publish(text))
    except MultiverseError as exc:
        raise cmdline.BadParameter(exc.message, param_hint="'--publish'") from exc


@cmdline.command()
@cmdline.argument("image", required=False)
@cmdline.option("-n", "--name", help="Instance name (default: a generated one).")
@cmdline.option("-c", "--cpus", type=cmdline.IntRange(1), default=1, show_default=True)
@cmdline.option(
    "-m", "--memory", callback=_size, default="1G", show_default=True, help="Memory, e.g. 512M, 2G."
)
@cmdline.option(
    "-d", "--disk", callback=_size, default="5G", show_default=True, help="Disk, e.g. 10G."
)
@cmdline.option("--node", help="Put it on this node.")
@cmdline.option(
    "--selector",
    callback=labels_option,
    default="",
    help="Only on nodes with these labels: k=v,...",
)
@cmdline.option(
    "--labels", "labels", callback=labels_option, default="", help="Labels of the instance: k=v,..."
)
@cmdline.option(
    "--strategy", type=cmdline.Choice(["spread", "binpack"]), default="spread", show_default=True
)
@cmdline.option(
    "--cloud-init",
    type=cmdline.Path(exists=True, dir_okay=False),
    help="User-data file for the guest.",
)
@cmdline.option("--ip", default="", help="A free address of the cluster network for it.")
@cmdline.option(
    "--count",
    type=cmdline.IntRange(1),
    help="Launch this many, named from {n} in --name (web-{n}: web-1, web-2, ...).",
)
@cmdline.option(
    "--publish",
    "-p",
    multiple=True,
    callback=lambda _ctx, _param, values: [_publish(value) for value in values],
    help="Forward a port of its node to it: NODE_PORT:GUEST_PORT[/udp] (repeatable).",
)
@with_wait
@format_option
def launch(
    image: str | None,
    name: str | None,
    cpus: int,
    memory: int,
    disk: int,
    node: str | None,
    selector: dict[str, str],
    labels: dict[str, str],
    strategy: str,
    cloud_init: Path | None,
    ip: str,
    count: int | None,
    publish: list[str],
    no_wait: bool,
    timeout: float,
    fmt: str,
) -> None:
    """Create and start an instance of IMAGE (default: the master's default image), or
    ``--count`` of them; waits until it is (they are) Running."""
    import random

    client = api_client()
    generated = f"vm-{random.randbytes(3).hex()}" + ("-{n}" if count is not None else "")
    body: dict[str, Any] = {
        "name": name or generated,
        "cpus": cpus,
        "memory": memory,
        "disk": disk,
        "node": node,
        "selector": selector,
        "labels": labels,
        "strategy": strategy,
        "user_data": cloud_init.read_text() if cloud_init else "",
    }
    if image is not None:  # else the master's default image
        body["image"] = image
    if ip:
        body["ip"] = ip
    if publish:
        body["publish"] = publish
    if count is not None:
        body["count"] = count
        _launch_many(client, client.launch(body), no_wait, timeout, fmt)
        return
    item = client.launch(body)
    if not no_wait:
        wait_for(client, item["operation"], timeout, f"Launching {item['name']}", item["name"])
        item = client.instance(item["name"])
    if fmt == "table":
        cmdline.echo(f"Launched: {item['name']} on {item['node']} ({item['state']})")
    else:
        cmdline.echo(render([item], INSTANCE_COLUMNS, fmt))


def _launch_many(
    client: ApiClient, launched: dict[str, Any], no_wait: bool, timeout: float, fmt: str
) -> None:
    items = launched["instances"]
    if not no_wait:
        wait_for(client, launched["operation"], timeout, f"Launching {len(items)} instances")
        items = client.info([item["name"] for item in items])  # each node asked once
    if fmt == "table":
        cmdline.echo(f"Launched {len(items)} instances:")
    cmdline.echo(render(items, INSTANCE_COLUMNS, fmt))


def _targets(names: tuple[str, ...], all_: bool, client: ApiClient) -> list[str]:
    if all_:
        return [item["name"] for item in client.instances()]
    if not names:
        raise cmdline.UsageError("name at least one instance, or use --all")
    return list(names)


def _act(
    names: tuple[str, ...],
    all_: bool,
    wait: float | None,
    call: Callable[[ApiClient, str], dict[str, Any]],
    gerund: str,
    past: str,
) -> None:
    """Apply ``call`` to each instance; wait (unless ``wait`` is None) for its operation.

    One instance failing does not stop the others; the exit code tells that any failed.
    """
    client = api_client()
    failures = 0
    for name in _targets(names, all_, client):
        try:
            started = call(client, name)
            if wait is not None:
                wait_for(client, started["operation"], wait, f"{gerund} {name}", name)
            cmdline.echo(f"{past} {name}")
        except (ApiError, Failure) as exc:
            stderr.print(f"{name}: {exc}", highlight=False, markup=False)
            failures += 1
    if failures:
        sys.exit(EXIT_FAILED)


def _names(func: Callable[..., None]) -> Callable[..., None]:
    func = with_wait(func)
    func = cmdline.option("--all", "all_", is_flag=True, help="Every instance.")(func)
    return cmdline.argument("names", nargs=-1)(func)


@cmdline.command()
@_names
def start(names: tuple[str, ...], all_: bool, no_wait: bool, timeout: float) -> None:
    """Start instances; waits until they are Running."""
    _act(
        names,
        all_,
        None if no_wait else timeout,
        lambda c, n: c.action(n, "start"),
        "Starting",
        "Started",
    )


@cmdline.command()
@_names
@cmdline.option("--force", is_flag=True, help="Power off at once, no clean shutdown.")
def stop(names: tuple[str, ...], all_: bool, no_wait: bool, timeout: float, force: bool) -> None:
    """Stop instances; waits until they are Stopped."""
    _act(
        names,
        all_,
        None if no_wait else timeout,
        lambda c, n: c.action(n, "stop", {"force": force}),
        "Stopping",
        "Stopped",
    )


@cmdline.command()
@_names
def restart(names: tuple[str, ...], all_: bool, no_wait: bool, timeout: float) -> None:
    """Restart instances; waits until they are Running again."""
    _act(
        names,
        all_,
        None if no_wait else timeout,
        lambda c, n: c.action(n, "restart"),
        "Restarting",
        "Restarted",
    )


@cmdline.command()
@_names
@cmdline.option(
    "-f",
    "--file",
    "path",
    type=cmdline.Path(exists=True, dir_okay=False),
    help="Delete the environment this file describes (see `apply`), all of it.",
)
def delete(
    names: tuple[str, ...], all_: bool, no_wait: bool, timeout: float, path: Path | None
) -> None:
    """Delete instances and everything they own; waits until they are gone."""
    if path is not None:
        if names or all_:
            raise cmdline.UsageError("give instance names or -f FILE, not both")
        from multiverse.client.environments import read_environment

        _delete_environment(read_environment(path).name, no_wait, timeout)
        return
    _act(
        names,
        all_,
        None if no_wait else timeout,
        lambda c, n: c.delete(n),
        "Deleting",
        "Deleted",
    )


def _delete_environment(name: str, no_wait: bool, timeout: float) -> None:
    client = api_client()
    started = client.delete_environment(name)
    if not no_wait:
        wait_for(client, started["operation"], timeout, f"Deleting environment {name}")
    gone = ", ".join(item["name"] for item in started["instances"])
    cmdline.echo(f"Deleted environment {name}: {gone}")


def _attach(client: ApiClient, name: str, command: Sequence[str], want_tty: bool) -> None:
    import asyncio

    from multiverse.client.terminal import attach

    sys.exit(asyncio.run(attach(client, name, command, want_tty)))


@cmdline.command()
@cmdline.option(
    "--no-ssh",
    is_flag=True,
    help="Go through Multiverse's own session even where OpenSSH could reach the guest.",
)
@cmdline.argument("name", default="primary")
def shell(no_ssh: bool, name: str) -> None:
    """Open a shell in an instance (default: primary), like `multipass shell`.

    The terminal's size follows yours; exits with the shell's exit code. Piped stdin works too:
    echo 'uname -a' | multiverse shell NAME

    On a terminal, on the instance's own node, with OpenSSH installed, the shell is OpenSSH's,
    logged in with a key of this CLI's that the master lets in for a few seconds: keystrokes
    then go straight to the guest. Elsewhere they go through the node's agent.
    """
    client = api_client()
    interactive = sys.stdin.isatty()
    if interactive and not no_ssh:
        from multiverse.client.openssh import exec_openssh

        exec_openssh(client, name)  # returns only where OpenSSH cannot take the session
    _attach(client, name, [], interactive)


@cmdline.command(name="exec", trailing_command=True)
@cmdline.option("-t", "--tty", "want_tty", is_flag=True, help="Run the command on a terminal.")
@cmdline.argument("name")
@cmdline.argument("command", nargs=-1, required=True)
def exec_(want_tty: bool, name: str, command: tuple[str, ...]) -> None:
    """Run a command in an instance: multiverse exec NAME -- CMD ARGS.

    Output streams as it comes, stdout and stderr apart; exits with the command's code.
    With -t the command runs on a terminal, as in `multiverse shell`.
    """
    if want_tty:
        _attach(api_client(), name, command, want_tty=True)
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    code = 0
    for item in api_client().exec(name, list(command), stdin):
        if "exit_code" in item:
            code = int(item["exit_code"])
        else:
            out = sys.stdout if item["stream"] == 1 else sys.stderr
            out.buffer.write(item["data"])
            out.flush()
    sys.exit(code)


@cmdline.command()
def events() -> None:
    """Stream lifecycle events as JSON lines until interrupted."""
    import asyncio

    from multiverse.client.terminal import follow_events

    client = api_client()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(follow_events(client)))


@cmdline.command()
@cmdline.argument("name")
@cmdline.option("--node", "target", required=True, help="The node to move the instance to.")
@cmdline.option(
    "--live/--cold",
    default=False,
    help="Keep it running while it moves (QEMU), or stop, copy its disk and start it there.",
)
@with_wait
def move(name: str, target: str, live: bool, no_wait: bool, timeout: float) -> None:
    """Move an instance to another node with its disk; it ends as it was (running or not)."""
    client = api_client()
    answer = client.move(name, target, "live" if live else "cold")
    if no_wait:
        cmdline.echo(answer["operation"])
        return
    wait_for(client, answer["operation"], timeout, f"Moving {name} to {target}")
    cmdline.echo(f"Moved {name} to {target}")


@cmdline.command()
@cmdline.argument("name")
def logs(name: str) -> None:
    """Print an instance's console log."""
    cmdline.echo(api_client().logs(name), nl=False)
