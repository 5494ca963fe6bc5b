"""The ``multiverse`` commands that talk to a master: every one is a call of the REST API.

Exit codes, as Multipass: 0 ok, 1 usage error, 2 the request failed, 3 the master is unreachable.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from multiverse import __version__
from multiverse.client.errors import ApiError, Unreachable
from multiverse.client.output import FORMATS, Column, render, render_one
from multiverse.core.errors import MultiverseError
from multiverse.core.sizes import format_size, parse_size

if TYPE_CHECKING:
    from rich.console import Console

    from multiverse.client.http import ApiClient
    from multiverse.core.environment import EnvironmentSpec

# Imported where a command needs them, not here: rich, websockets, asyncio, the HTTP client and
# TLS together cost several times what the rest of a call's start does (`python -X importtime
# -m multiverse --version` shows it), and most commands need one or two of them. So are the
# model's and the network's parsers (their dataclasses, enums and regexes): only the options
# that parse with them load them.

EXIT_USAGE, EXIT_FAILED, EXIT_UNREACHABLE = 1, 2, 3


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


class Failure(Exception):
    """The request went through but did not end as asked (e.g. a launch ended Failed)."""


def _client() -> ApiClient:
    from multiverse.client.config import ClientConfig
    from multiverse.client.http import ApiClient

    try:
        config = ClientConfig.load()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not config.server:
        raise click.UsageError(
            f"no master configured ({config.source} not found): start one with `multiverse up`, "
            "or set MULTIVERSE_SERVER and MULTIVERSE_TOKEN"
        )
    return ApiClient(config.server, config.token, verify=config.ssl_context())


format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)


def _ago(stamp: str | None) -> str:
    if not stamp:
        return "never"
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_of(item: dict[str, Any], size: bool = True) -> str:
    show = format_size if size else str
    return f"{show(item['free'])}/{show(item['total'])}"


def _node_status(node: dict[str, Any]) -> str:
    """``Installing (venv)``, ``Failed (connect)``: `node add`'s step, the message's head."""
    step = (node.get("message") or "").replace(":", " ").split(" ", 1)[0]
    return (
        f"{node['status']} ({step})"
        if step and node["status"] in INSTALL_STATES
        else (node["status"])
    )


INSTALL_STATES = ("Installing", "Failed")
NODE_COLUMNS = [
    Column("Node Name", lambda n: n["name"]),
    Column("Status", lambda n: _node_status(n) + (",Cordoned" if n.get("cordoned") else "")),
    Column("IPv4", lambda n: n["ipv4"]),
    Column("Cpu", lambda n: _free_of(n["cpus"], size=False)),
    Column("Mem", lambda n: _free_of(n["memory"])),
    Column("Disk", lambda n: _free_of(n["disk"])),
    Column("Instances", lambda n: n["instances"]),
    Column("Network", lambda n: n.get("network_mode") or "--"),
    Column("Last Sync", lambda n: _ago(n["last_sync"])),
]
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
def cli() -> None:
    """Multiverse: launch and manage virtual machines on many hosts from one place."""


MASTER_COLUMNS = [
    Column("API", lambda m: m["api"]),
    Column("Cluster", lambda m: m["cluster"]),
    Column("Leader", lambda m: "yes" if m["leader"] and m["status"] == "up" else ""),
    Column("Status", lambda m: m["status"]),
    Column("Last Seen", lambda m: m["last_seen"]),
]


@cli.command()
@format_option
def masters(fmt: str) -> None:
    """List the masters serving the cluster, and which one leads."""
    click.echo(render(_client().masters(), MASTER_COLUMNS, fmt))


label_filter = click.option(
    "--labels", "label", default="", help="Only those with these labels: k=v,..."
)


@cli.command()
@label_filter
@format_option
def nodes(label: str, fmt: str) -> None:
    """List the cluster's nodes."""
    click.echo(render(_client().nodes(label=label), NODE_COLUMNS, fmt))


@cli.command(name="instances")
@click.option("--node", default="", help="Only those on this node.")
@click.option("--state", default="", help="Only those in this state (Running, Stopped...).")
@label_filter
@click.option("--env", help="Only the instances of this environment (see `apply`).")
@format_option
def instances_(node: str, state: str, label: str, env: str | None, fmt: str) -> None:
    """List instances (aliases: list, ls)."""
    listed = _client().instances(node=node, state=state, label=label, env=env)
    click.echo(render(listed, INSTANCE_COLUMNS, fmt))


cli.add_command(instances_, name="list")
cli.add_command(instances_, name="ls")


IMAGE_COLUMNS = [
    Column("Image", lambda i: i["name"]),
    Column("Kind", lambda i: i["kind"]),
    Column("Size", lambda i: format_size(i["size"]) if i["size"] else "--"),
    Column("Digest", lambda i: i["digest"][:19]),
    Column("Nodes", lambda i: ",".join(i["nodes"])),
]


@cli.command()
@format_option
def images(fmt: str) -> None:
    """List the images the nodes can boot (launch's default is tiny)."""
    click.echo(render(_client().images(), IMAGE_COLUMNS, fmt))


NETWORK_NODE_COLUMNS = [
    Column("Node Name", lambda n: n["name"]),
    Column("Address", lambda n: n["address"]),
    Column("VTEP", lambda n: n["vtep"]),
    Column("Mode", lambda n: n["mode"] or "--"),
]


@cli.command()
@format_option
def network(fmt: str) -> None:
    """Show the cluster network: its CIDR, how much of it is leased, each node's VTEP."""
    body = _client().network()
    if fmt in ("json", "yaml"):
        click.echo(render([body], [], fmt))
        return
    if fmt == "csv":
        click.echo(render(body["nodes"], NETWORK_NODE_COLUMNS, fmt))
        return
    nat = "on" if body["nat"] else "off"
    click.echo(
        f"Network {body['name']}: {body['cidr']} (VXLAN {body['vni']}, NAT {nat}), "
        f"{body['used']} of {body['size']} addresses leased ({body['instances']} instances)"
    )
    click.echo(render(body["nodes"], NETWORK_NODE_COLUMNS, fmt))


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="All instances (the default with no NAME).")
@format_option
def info(names: tuple[str, ...], all_: bool, fmt: str) -> None:
    """Show load, memory and disk from inside instances."""
    found = _client().info(list(names) if names and not all_ else None)
    click.echo(render(found, INFO_COLUMNS, fmt))


T = TypeVar("T")


def parsed(
    parse: Callable[[str], T],
) -> Callable[[click.Context, click.Parameter, str | None], T | None]:
    """A click callback that runs ``parse`` on an option's text: our validation errors become
    usage errors (exit code 1) naming the option."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> T | None:
        if value is None:
            return None
        try:
            return parse(value)
        except MultiverseError as exc:
            raise click.BadParameter(exc.message) from exc

    return callback


def _labels(text: str) -> dict[str, str]:
    from multiverse.core.model import parse_labels

    return parse_labels(text)


_size = parsed(parse_size)
labels_option = parsed(_labels)


def _publish(text: str) -> str:
    from multiverse.core.network import parse_publish

    try:
        return str(parse_publish(text))
    except MultiverseError as exc:
        raise click.BadParameter(exc.message, param_hint="'--publish'") from exc


@contextmanager
def _spinner(text: str) -> Iterator[Callable[[str], None]]:
    if not sys.stderr.isatty():  # nobody would see it: spare scripts the import of rich
        yield lambda state: None
        return
    with stderr.status(text) as status:
        yield lambda state: status.update(f"{text}: {state}")


def _wait(
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
    click.option("--no-wait", is_flag=True, help="Return at once instead of waiting."),
    click.option(
        "--timeout",
        type=click.FloatRange(1),
        default=600,
        show_default=True,
        help="Seconds to wait.",
    ),
]


def _with_wait(func: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(wait_options):
        func = option(func)
    return func


@cli.command()
@click.argument("image", required=False)
@click.option("-n", "--name", help="Instance name (default: a generated one).")
@click.option("-c", "--cpus", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "-m", "--memory", callback=_size, default="1G", show_default=True, help="Memory, e.g. 512M, 2G."
)
@click.option(
    "-d", "--disk", callback=_size, default="5G", show_default=True, help="Disk, e.g. 10G."
)
@click.option("--node", help="Put it on this node.")
@click.option(
    "--selector",
    callback=labels_option,
    default="",
    help="Only on nodes with these labels: k=v,...",
)
@click.option(
    "--labels", "labels", callback=labels_option, default="", help="Labels of the instance: k=v,..."
)
@click.option(
    "--strategy", type=click.Choice(["spread", "binpack"]), default="spread", show_default=True
)
@click.option(
    "--cloud-init",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="User-data file for the guest.",
)
@click.option("--ip", default="", help="A free address of the cluster network for it.")
@click.option(
    "--count",
    type=click.IntRange(1),
    help="Launch this many, named from {n} in --name (web-{n}: web-1, web-2, ...).",
)
@click.option(
    "--publish",
    "-p",
    multiple=True,
    callback=lambda _ctx, _param, values: [_publish(value) for value in values],
    help="Forward a port of its node to it: NODE_PORT:GUEST_PORT[/udp] (repeatable).",
)
@_with_wait
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

    client = _client()
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
        _wait(client, item["operation"], timeout, f"Launching {item['name']}", item["name"])
        item = client.instance(item["name"])
    if fmt == "table":
        click.echo(f"Launched: {item['name']} on {item['node']} ({item['state']})")
    else:
        click.echo(render([item], INSTANCE_COLUMNS, fmt))


def _launch_many(
    client: ApiClient, launched: dict[str, Any], no_wait: bool, timeout: float, fmt: str
) -> None:
    items = launched["instances"]
    if not no_wait:
        _wait(client, launched["operation"], timeout, f"Launching {len(items)} instances")
        items = client.info([item["name"] for item in items])  # each node asked once
    if fmt == "table":
        click.echo(f"Launched {len(items)} instances:")
    click.echo(render(items, INSTANCE_COLUMNS, fmt))


def _targets(names: tuple[str, ...], all_: bool, client: ApiClient) -> list[str]:
    if all_:
        return [item["name"] for item in client.instances()]
    if not names:
        raise click.UsageError("name at least one instance, or use --all")
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
    client = _client()
    failures = 0
    for name in _targets(names, all_, client):
        try:
            started = call(client, name)
            if wait is not None:
                _wait(client, started["operation"], wait, f"{gerund} {name}", name)
            click.echo(f"{past} {name}")
        except (ApiError, Failure) as exc:
            stderr.print(f"{name}: {exc}", highlight=False, markup=False)
            failures += 1
    if failures:
        sys.exit(EXIT_FAILED)


def _names(func: Callable[..., None]) -> Callable[..., None]:
    func = _with_wait(func)
    func = click.option("--all", "all_", is_flag=True, help="Every instance.")(func)
    return click.argument("names", nargs=-1)(func)


@cli.command()
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


@cli.command()
@_names
@click.option("--force", is_flag=True, help="Power off at once, no clean shutdown.")
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


@cli.command()
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


def read_environment(path: Path) -> EnvironmentSpec:
    """An environment file (`apply -f`), checked; a problem names its line and column."""
    from multiverse.core.environment import parse_yaml  # yaml and jinja2: only for this

    def read(name: str) -> str:
        return (path.parent / name).read_text()  # cloud-init: FILE, beside the file

    try:
        return parse_yaml(path.read_text(), str(path), read)
    except MultiverseError as exc:
        raise click.ClickException(exc.message) from exc


@cli.command()
@_names
@click.option(
    "-f",
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Delete the environment this file describes (see `apply`), all of it.",
)
def delete(
    names: tuple[str, ...], all_: bool, no_wait: bool, timeout: float, path: Path | None
) -> None:
    """Delete instances and everything they own; waits until they are gone."""
    if path is not None:
        if names or all_:
            raise click.UsageError("give instance names or -f FILE, not both")
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
    client = _client()
    started = client.delete_environment(name)
    if not no_wait:
        _wait(client, started["operation"], timeout, f"Deleting environment {name}")
    gone = ", ".join(item["name"] for item in started["instances"])
    click.echo(f"Deleted environment {name}: {gone}")


def _attach(name: str, command: Sequence[str], want_tty: bool) -> None:
    import asyncio

    from multiverse.client.terminal import attach

    client = _client()
    sys.exit(asyncio.run(attach(client, name, command, want_tty)))


@cli.command()
@click.argument("name", default="primary")
def shell(name: str) -> None:
    """Open a shell in an instance (default: primary), like `multipass shell`.

    The terminal's size follows yours; exits with the shell's exit code. Piped stdin works too:
    echo 'uname -a' | multiverse shell NAME
    """
    _attach(name, [], sys.stdin.isatty())


@cli.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("-t", "--tty", "want_tty", is_flag=True, help="Run the command on a terminal.")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(want_tty: bool, name: str, command: tuple[str, ...]) -> None:
    """Run a command in an instance: multiverse exec NAME -- CMD ARGS.

    Output streams as it comes, stdout and stderr apart; exits with the command's code.
    With -t the command runs on a terminal, as in `multiverse shell`.
    """
    if want_tty:
        _attach(name, command, want_tty=True)
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    code = 0
    for item in _client().exec(name, list(command), stdin):
        if "exit_code" in item:
            code = int(item["exit_code"])
        else:
            out = sys.stdout if item["stream"] == 1 else sys.stderr
            out.buffer.write(item["data"])
            out.flush()
    sys.exit(code)


FAULT_COLUMNS = [
    Column("ID", lambda f: f["id"]),
    Column("Kind", lambda f: f["kind"]),
    Column("Target", lambda f: ",".join(f["targets"])),
    Column("Peers", lambda f: ",".join(f["peers"]) or "--"),
    Column("Params", lambda f: " ".join(f"{k}={v}" for k, v in f["params"].items()) or "--"),
    Column("Started", lambda f: _ago(f["started_at"])),
    Column("Expires", lambda f: f["expires_at"] or "never"),
]


@cli.group()
def fault() -> None:
    """Inject faults from outside the guests: partitions, slow links, pauses, kills..."""


def _fault(fmt: str, body: dict[str, Any]) -> None:
    click.echo(render_one(_client().add_fault(body), FAULT_COLUMNS, fmt))


_fault_duration = click.option("--duration", help="Heal by itself after this long (30s, 2m).")


def _split(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


_fault_env = click.option("--env", help="Every instance of this environment (as env:NAME).")


def _fault_targets(name: str | None, env: str | None) -> list[str]:
    """NAME (an instance, env:NAME or KEY=VALUE) or --env, exactly one of them."""
    if bool(name) == bool(env):
        raise click.UsageError("give an instance (or env:NAME, KEY=VALUE) or --env NAME")
    return [name] if name else [f"env:{env}"]


@fault.command(name="partition")
@click.argument("sides", nargs=-1, required=True)
@click.option("--one-way", is_flag=True, help="Cut only the first side's traffic to the second.")
@click.option("--env", help="With one side only: the other side is the rest of this environment.")
@_fault_duration
@format_option
def fault_partition(
    sides: tuple[str, ...], one_way: bool, env: str | None, duration: str | None, fmt: str
) -> None:
    """Cut the network between two sets of instances: `partition a,b / c,d`.

    A set may name instances, environments (env:lab) and labels (role=db); `partition a --env
    lab` cuts a from the rest of lab. Selectors are resolved when the fault is added."""
    text = " ".join(sides)
    if env is not None and "/" not in text:
        text += f" / env:{env}"
    elif env is not None or text.count("/") != 1:
        raise click.UsageError("give two sides separated by /: partition a,b / c,d (or a --env E)")
    left, right = text.split("/")
    _fault(fmt, {"kind": "partition", "targets": _split(left), "peers": _split(right),
                 "one_way": one_way, "duration": duration})  # fmt: skip


@fault.command(name="link")
@click.argument("name")
@click.option("--to", "to", default="", help="Instances at the other end (default: all).")
@click.option("--delay", help="e.g. 100ms")
@click.option("--jitter", help="e.g. 20ms (with --delay)")
@click.option("--loss", help="e.g. 5%")
@click.option("--duplicate", help="e.g. 1%")
@click.option("--reorder", help="e.g. 10% (with --delay)")
@click.option("--rate", help="e.g. 1mbit")
@_fault_duration
@format_option
def fault_link(name: str, to: str, duration: str | None, fmt: str, **params: str | None) -> None:
    """Slow, lose or reorder the packets from NAME to --to (netem, or NFQUEUE without it)."""
    given = {key: value for key, value in params.items() if value is not None}
    _fault(fmt, {"kind": "link", "targets": [name], "peers": _split(to), "params": given,
                 "duration": duration})  # fmt: skip


_SELECTED = "NAME may also be env:ENV or KEY=VALUE: every instance they match."


def _single(kind: str, doc: str) -> None:
    @fault.command(name=kind, help=f"{doc}\n\n{_SELECTED}")
    @click.argument("name", required=False)
    @_fault_env
    @_fault_duration
    @format_option
    def command(name: str | None, env: str | None, duration: str | None, fmt: str) -> None:
        _fault(fmt, {"kind": kind, "targets": _fault_targets(name, env), "duration": duration})


_single("pause", "Freeze NAME (QMP stop) until healed or --duration is over.")
_single("kill", "Power NAME off hard; it stays desired running, so it comes back.")
_single("reboot", "Reset NAME hard, as the reset button.")


@fault.command(name="clock")
@click.argument("name", required=False)
@_fault_env
@click.option("--skew", help="Step the guest's clock, e.g. +5s or -2m.")
@click.option("--drift", help="Run the guest's clock fast or slow, e.g. 100ppm or -50ppm.")
@_fault_duration
@format_option
def fault_clock(
    name: str | None, env: str | None, skew: str | None, drift: str | None,
    duration: str | None, fmt: str,
) -> None:  # fmt: skip
    """Step NAME's clock by --skew and/or make it drift (both undone when healed).

    NAME may also be env:ENV or KEY=VALUE: every instance they match. --drift goes through
    the guest kernel (adjtimex, as NTP would): QEMU cannot change the clock rate of a running
    guest."""
    params = {k: v for k, v in (("skew", skew), ("drift", drift)) if v is not None}
    _fault(fmt, {"kind": "clock", "targets": _fault_targets(name, env), "params": params,
                 "duration": duration})  # fmt: skip


@fault.command(name="disk")
@click.argument("name", required=False)
@_fault_env
@click.option("--full", is_flag=True, help="Fill the data disk to the brim.")
@click.option("--slow", help="Throttle the data disk to one I/O per this long, e.g. 10ms.")
@_fault_duration
@format_option
def fault_disk(
    name: str | None, env: str | None, full: bool, slow: str | None, duration: str | None,
    fmt: str,
) -> None:  # fmt: skip
    """Fill NAME's data disk or slow it down.

    NAME may also be env:ENV or KEY=VALUE: every instance they match."""
    params = {"full": "true"} if full else {}
    if slow:
        params["slow"] = slow
    _fault(fmt, {"kind": "disk", "targets": _fault_targets(name, env), "params": params,
                 "duration": duration})  # fmt: skip


@fault.command(name="list")
@format_option
def fault_list(fmt: str) -> None:
    """The faults in force."""
    click.echo(render(_client().faults(), FAULT_COLUMNS, fmt))


@fault.command(name="heal")
@click.argument("fault_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Heal every fault.")
@format_option
def fault_heal(fault_id: str | None, all_: bool, fmt: str) -> None:
    """Heal one fault by its id, or all of them."""
    if bool(fault_id) == all_:
        raise click.UsageError("give a fault ID or --all")
    click.echo(render(_client().heal_fault(None if all_ else fault_id), FAULT_COLUMNS, fmt))


@cli.group()
def node() -> None:
    """Node maintenance, as Incus: cordon, uncordon, drain, evacuate, restore; labels."""


@node.command()
@click.argument("name")
def cordon(name: str) -> None:
    """Place no new instances on the node."""
    _client().node_action(name, "cordon")
    click.echo(f"Cordoned {name}")


@node.command()
@click.argument("name")
def uncordon(name: str) -> None:
    """Place instances on the node again."""
    _client().node_action(name, "uncordon")
    click.echo(f"Uncordoned {name}")


def _label_changes(items: tuple[str, ...]) -> dict[str, str | None]:
    """``k=v`` sets, ``k-`` removes (as kubectl label)."""
    changes: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep:
            from multiverse.core.model import validate_labels

            validate_labels({key: value})
            changes[key] = value
        elif item.endswith("-") and len(item) > 1:
            changes[item[:-1]] = None
        else:
            raise click.BadParameter(f"{item!r}: use key=value to set, key- to remove")
    return changes


@node.command()
@click.argument("name")
@click.argument("labels", nargs=-1, required=True)
def label(name: str, labels: tuple[str, ...]) -> None:
    """Set labels on a node: k=v sets, k- removes (as kubectl label).

    They win over the labels the node reports of itself for placement, and its re-joins keep
    them; removing one lets the node's own label of that key count again.
    """
    try:
        changes = _label_changes(labels)
    except MultiverseError as exc:
        raise click.BadParameter(exc.message) from exc
    item = _client().label_node(name, changes)
    shown = ",".join(f"{k}={v}" for k, v in sorted(item["admin_labels"].items())) or "none"
    click.echo(f"Labelled {name}; labels set by admins: {shown}")


def _ssh_credentials(identity: Path | None, password_stdin: bool) -> dict[str, str]:
    """The SSH login for the master to use: a key's text or a password read from stdin (never
    an argument: `ps` shows those). Sent in the request body, over TLS."""
    if identity is not None and password_stdin:
        raise click.UsageError("give --identity or --password-stdin, not both")
    if identity is not None:
        try:
            return {"identity": identity.read_text()}
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {identity}: {exc}") from exc
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.UsageError("--password-stdin read an empty password")
        return {"password": password}
    raise click.UsageError("give --identity KEY (preferred) or --password-stdin")


ssh_login_options = [
    click.option(
        "--identity",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Private key to log in with (preferred over a password).",
    ),
    click.option(
        "--password-stdin",
        is_flag=True,
        help="Read the SSH password from stdin (a key is preferred; it is never stored).",
    ),
]


def _with_ssh_login(func: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(ssh_login_options):
        func = option(func)
    return func


@node.command(name="add")
@click.argument("name")
@click.option("--ssh", "target", required=True, help="The host: user@host[:port].")
@_with_ssh_login
@click.option(
    "--host-key-fingerprint",
    default="",
    help="Trust this host key (SHA256:..., as `ssh-keygen -lf` prints it) instead of "
    "looking the host up in --known-hosts.",
)
@click.option(
    "--known-hosts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: Path.home() / ".ssh" / "known_hosts",
    show_default="~/.ssh/known_hosts",
    help="The host keys you trust; an unknown key is refused.",
)
@click.option(
    "--driver",
    type=click.Choice(["qemu", "firecracker", "multipass", "fake"]),
    default="qemu",
    show_default=True,
)
@click.option("--labels", callback=labels_option, default="", help="Node labels: k=v,...")
@click.option("--install-deps", is_flag=True, help="apt-get install the driver's packages too.")
@click.option(
    "--root", default="/opt/multiverse", show_default=True, help="Install root on the host."
)
@_with_wait
def add(
    name: str,
    target: str,
    identity: Path | None,
    password_stdin: bool,
    host_key_fingerprint: str,
    known_hosts: Path,
    driver: str,
    labels: dict[str, str],
    install_deps: bool,
    root: str,
    no_wait: bool,
    timeout: float,
) -> None:
    """Install a worker on a host over SSH and join it as node NAME.

    The master logs in (a key is preferred: --identity; or --password-stdin), checks the host
    key, copies its own wheels, installs a venv under --root, starts the worker as a systemd
    unit (or a supervised process where systemd does not run) and waits until it joins.
    Running it again retries a failed install.
    """
    body: dict[str, Any] = {
        "name": name, "ssh": target, "driver": driver, "labels": labels,
        "install_deps": install_deps, "root": root,
        "host_key_fingerprint": host_key_fingerprint,
        **_ssh_credentials(identity, password_stdin),
    }  # fmt: skip
    if not host_key_fingerprint and known_hosts.is_file():
        body["known_hosts"] = known_hosts.read_text(errors="replace")
    client = _client()
    operation = client.add_node(body)
    if no_wait:
        click.echo(operation["id"])
        return
    done = _wait(client, operation["id"], timeout, f"Installing {name}")
    service = (done["result"] or {}).get("service", "")
    click.echo(f"Node {name} is Ready; its worker runs as {service}")


@node.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Also forget its instances (their VMs stay there).")
@click.option(
    "--uninstall",
    is_flag=True,
    help="Also stop the worker `node add` installed and remove its unit, venv and data dir "
    "(over SSH: give --identity or --password-stdin).",
)
@_with_ssh_login
@click.option("--timeout", type=click.FloatRange(1), default=600, show_default=True)
def remove(
    name: str,
    force: bool,
    uninstall: bool,
    identity: Path | None,
    password_stdin: bool,
    timeout: float,
) -> None:
    """Forget a node and revoke its certificate; it can come back only with a new token."""
    client = _client()
    if uninstall:
        if force:
            raise click.UsageError("--uninstall needs the node's instances gone; no --force")
        operation = client.uninstall_node(name, _ssh_credentials(identity, password_stdin))
        _wait(client, operation["id"], timeout, f"Uninstalling {name}")
        click.echo(f"Removed {name}: its worker, unit, venv and data dir are gone")
        return
    client.remove_node(name, force)
    click.echo(f"Removed {name}; its certificate is revoked")


def _maintain(
    action: str, name: str, no_wait: bool, timeout: float, fmt: str, mode: str = ""
) -> None:
    client = _client()
    operation = client.node_action(name, action, {"mode": mode} if mode else None)
    if no_wait:
        click.echo(operation["id"])
        return
    done = _wait(client, operation["id"], timeout, f"{action.capitalize()} {name}")
    outcomes = done["result"] or []
    if fmt == "table" and not outcomes:
        click.echo(f"{action}: nothing to do on {name}")
        return
    columns = [
        Column("Instance Name", lambda o: o["name"]),
        Column("Outcome", lambda o: o["outcome"]),
    ]
    click.echo(render(outcomes, columns, fmt))


def _maintenance_command(action: str, summary: str) -> None:
    """``multiverse node ACTION NAME``: start the operation, wait, show each instance's fate."""

    def command(name: str, no_wait: bool, timeout: float, fmt: str) -> None:
        _maintain(action, name, no_wait, timeout, fmt)

    command.__doc__ = summary
    decorated = format_option(_with_wait(command))
    node.command(name=action)(click.argument("name")(decorated))


_maintenance_command("drain", "Cordon the node and stop its instances (restore starts them).")


@node.command()
@click.argument("name")
@click.option(
    "--mode",
    type=click.Choice(["move", "recreate"]),
    default="move",
    show_default=True,
    help="move: with their disks; recreate: fresh instances from their specs (disks lost).",
)
@format_option
@_with_wait
def evacuate(name: str, mode: str, no_wait: bool, timeout: float, fmt: str) -> None:
    """Cordon the node and move its instances, disks included, to other nodes."""
    _maintain("evacuate", name, no_wait, timeout, fmt, mode)


_maintenance_command(
    "restore", "Uncordon the node, bring evacuated instances back and start drained ones."
)


@cli.command()
def events() -> None:
    """Stream lifecycle events as JSON lines until interrupted."""
    import asyncio

    from multiverse.client.terminal import follow_events

    client = _client()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(follow_events(client)))


@cli.command()
@click.argument("name")
@click.option("--node", "target", required=True, help="The node to move the instance to.")
@click.option(
    "--live/--cold",
    default=False,
    help="Keep it running while it moves (QEMU), or stop, copy its disk and start it there.",
)
@_with_wait
def move(name: str, target: str, live: bool, no_wait: bool, timeout: float) -> None:
    """Move an instance to another node with its disk; it ends as it was (running or not)."""
    client = _client()
    answer = client.move(name, target, "live" if live else "cold")
    if no_wait:
        click.echo(answer["operation"])
        return
    _wait(client, answer["operation"], timeout, f"Moving {name} to {target}")
    click.echo(f"Moved {name} to {target}")


@cli.command()
@click.argument("name")
def logs(name: str) -> None:
    """Print an instance's console log."""
    click.echo(_client().logs(name), nl=False)


@cli.group()
def token() -> None:
    """Join tokens for workers and API tokens for people and scripts."""


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = value[:-1], value[-1:]
    if unit.isdigit():
        number, unit = value, "s"
    if not number.isdigit() or unit not in units or int(number) == 0:
        raise click.BadParameter(f"invalid duration {value!r}: use e.g. 30m, 1h, 7d")
    return int(number) * units[unit]


@token.command(name="create")
@click.option("--api", is_flag=True, help="An API token instead of a join token.")
@click.option(
    "--role",
    type=click.Choice(["admin", "viewer"]),
    default="admin",
    show_default=True,
    help="With --api.",
)
@click.option("--ttl", callback=_duration, help="Lifetime, e.g. 1h (join tokens: default 1h).")
@click.option(
    "--uses", type=click.IntRange(1), help="Join tokens: how many workers may use it (default 1)."
)
@click.option("--description", default="")
@format_option
def token_create(
    api: bool, role: str, ttl: int | None, uses: int | None, description: str, fmt: str
) -> None:
    """Create a token; prints it once (it is not stored) and its id (on stderr)."""
    if api and uses is not None:
        raise click.UsageError(
            "--uses is for join tokens only: an API token is valid for every request until it "
            "expires (--ttl) or is revoked"
        )
    item = _client().create_token(
        {
            "kind": "api" if api else "join",
            "role": role,
            "ttl_seconds": ttl,
            "uses": uses,
            "description": description,
        }
    )
    if fmt == "table":
        # The token alone on stdout, so that `$(multiverse token create)` is the token.
        click.echo(item["token"])
        stderr.print(
            f"Token id: {item['id']} (`multiverse token revoke {item['id']}` revokes it)",
            highlight=False,
            markup=False,
        )
    else:
        columns = [Column("ID", lambda t: t["id"]), Column("Token", lambda t: t["token"])]
        click.echo(render_one(item, columns, fmt))


TOKEN_COLUMNS = [
    Column("ID", lambda t: t["id"]),
    Column("Kind", lambda t: t["kind"]),
    Column("Role", lambda t: t["role"]),
    Column("Expires", lambda t: t["expires_at"]),
    Column("Uses Left", lambda t: t["uses_left"]),
    Column("Revoked", lambda t: "yes" if t["revoked"] else "no"),
]


@token.command(name="list")
@format_option
def token_list(fmt: str) -> None:
    """List tokens (never their secrets)."""
    click.echo(render(_client().tokens(), TOKEN_COLUMNS, fmt))


@token.command(name="revoke")
@click.argument("token_or_id")
def token_revoke(token_or_id: str) -> None:
    """Revoke a token, given by its id or whole, as `token create` printed it."""
    client = _client()
    if "." in token_or_id:  # ids are hex; every token form has a dot
        done = client.revoke_token_itself(token_or_id)
    else:
        done = client.revoke_token(token_or_id)
    click.echo(f"Revoked {done['id']}")


def run(group: click.Group, args: Sequence[str] | None = None) -> int:
    """Run ``group`` with Multipass's exit codes and messages on stderr; returns the code."""
    try:
        result = group.main(args=args, prog_name="multiverse", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.Abort:
        stderr.print("Aborted.")
        return EXIT_USAGE
    except Unreachable as exc:
        stderr.print(
            f"{exc}\nIs the master running? Start one with `multiverse up`.",
            highlight=False,
            markup=False,
        )
        return EXIT_UNREACHABLE
    except (ApiError, Failure, MultiverseError) as exc:
        stderr.print(str(exc), highlight=False, markup=False)
        return EXIT_FAILED


def main() -> None:
    sys.exit(run(cli))


# ---- images ----------------------------------------------------------------------------------

STORED_IMAGE_COLUMNS = [
    Column("Image", lambda i: i["name"]),
    Column("Aliases", lambda i: ",".join(i["aliases"])),
    Column("Kind", lambda i: i["kind"]),
    Column("Size", lambda i: format_size(i["size"])),
    Column("Digest", lambda i: i["digest"][:19]),
    Column("Nodes", lambda i: ",".join(i["nodes"])),
]


@cli.group()
def image() -> None:
    """Images of the master's store: import, list, delete, pull to nodes, build."""


@contextmanager
def _bar(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of bytes on stderr; yields ``update(done, total)``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task(label, total=total or None)

        def update(done: int, new_total: int) -> None:
            bar.update(task, completed=done, total=new_total or None)

        yield update


def wait_with_progress(client: ApiClient, operation: dict[str, Any], timeout: float) -> Any:
    """Wait for an import or pull operation, its bytes as a bar; its result once it succeeded."""
    deadline = time.monotonic() + timeout
    label = f"{operation['kind']} {operation['target']}"
    with _bar(label, 0) as update:
        while True:
            operation = client.wait_operation(operation["id"], timeout=1)
            if operation["status"] == "success":
                return operation["result"]
            if operation["status"] == "failure":
                raise Failure(operation["error"] or f"{label} failed")
            if time.monotonic() > deadline:
                raise Failure(f"{label}: still not done after {timeout:.0f}s")
            progress = operation.get("transfer") or {}
            update(int(progress.get("done", 0)), int(progress.get("total", 0)))


def _sha256_of(path: Path, update: Callable[[int, int], None]) -> str:
    import hashlib

    digest = hashlib.sha256()
    done, total = 0, path.stat().st_size
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            digest.update(block)
            done += len(block)
            update(done, total)
    return digest.hexdigest()


def upload_files(client: ApiClient, files: dict[str, Path]) -> dict[str, str]:
    """Send each file the master does not have yet, streamed; {relative path: sha256}."""
    digests: dict[str, str] = {}
    for relative, path in sorted(files.items()):
        with _bar(f"hashing {relative}", path.stat().st_size) as update:
            sha256 = _sha256_of(path, update)
        digests[relative] = sha256
        if client.has_blob(sha256):
            continue
        with _bar(f"uploading {relative}", path.stat().st_size) as update:
            client.put_blob(sha256, path, update)
    return digests


@image.command(name="import")
@click.argument("source")
@click.option("--name", "name", required=True, help="The image's name.")
@click.option("--alias", "aliases", multiple=True, help="Another name for it (repeatable).")
@click.option("--sha256", default="", help="A URL's expected sha256 (required with a URL).")
@click.option("--size", "rootfs_size", default="2G", show_default=True,
              help="An OCI layout's ext4 root file system size.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1), default=3600, show_default=True)
@format_option
def image_import(
    source: str,
    name: str,
    aliases: tuple[str, ...],
    sha256: str,
    rootfs_size: str,
    timeout: float,
    fmt: str,
) -> None:
    """Import SOURCE as image NAME: a qcow2 or raw disk file, a directory (an OCI image layout,
    or an image directory with an image.json such as the tiny guest's), or an https URL with
    --sha256. Files go to the master streamed; the master tells the kind."""
    client = _client()
    body: dict[str, Any] = {"name": name, "aliases": list(aliases), "rootfs_size": rootfs_size}
    if source.startswith(("https://", "http://")):
        if not sha256:
            raise click.UsageError("a URL needs --sha256, so that what arrives can be checked")
        body.update(url=source, sha256=sha256)
    else:
        path = Path(source)
        if not path.exists():
            raise click.UsageError(f"{source} does not exist")
        if path.is_dir():
            files = {
                str(item.relative_to(path)): item
                for item in sorted(path.rglob("*"))
                if item.is_file() and not item.name.startswith(".")
            }
        else:
            files = {path.name: path}
        body["files"] = upload_files(client, files)
    operation = client.import_image(body)
    result = wait_with_progress(client, operation, timeout)
    click.echo(render([result], STORED_IMAGE_COLUMNS, fmt))


@image.command(name="list")
@format_option
def image_list(fmt: str) -> None:
    """The images of the master's store, and the nodes whose caches hold each."""
    click.echo(render(_client().stored_images(), STORED_IMAGE_COLUMNS, fmt))


@image.command(name="delete")
@click.argument("name")
@format_option
def image_delete(name: str, fmt: str) -> None:
    """Delete an image from the store (refused while an instance uses it)."""
    deleted = _client().delete_image(name)
    click.echo(f"deleted {deleted['name']}" if fmt == "table" else render([deleted], [], fmt))


@image.command(name="pull")
@click.argument("name")
@click.option("--node", "nodes", multiple=True, help="A node to pull to (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Every Ready node.")
@click.option("--timeout", type=click.FloatRange(1), default=3600, show_default=True)
@format_option
def image_pull(name: str, nodes: tuple[str, ...], all_: bool, timeout: float, fmt: str) -> None:
    """Warm nodes' image caches with NAME ahead of launches."""
    if not nodes and not all_:
        raise click.UsageError("name a node with --node, or use --all")
    client = _client()
    operation = client.pull_image(name, list(nodes), all_)
    result = wait_with_progress(client, operation, timeout)
    if fmt == "table":
        click.echo(f"pulled {result['image']} to {', '.join(result['nodes'])}")
    else:
        click.echo(render([result], [], fmt))
