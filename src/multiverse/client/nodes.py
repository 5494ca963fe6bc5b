"""Commands on the cluster's hosts: ``nodes``, ``masters``, ``network`` and the ``node`` group
(cordon, uncordon, label, add, remove, drain, evacuate, restore)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multiverse.client import cmdline
from multiverse.client.cli import (
    ago,
    api_client,
    format_option,
    label_filter,
    labels_option,
    wait_for,
    with_wait,
)
from multiverse.client.output import Column, render
from multiverse.core.errors import MultiverseError
from multiverse.core.sizes import format_size


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
    Column("Last Sync", lambda n: ago(n["last_sync"])),
]


MASTER_COLUMNS = [
    Column("API", lambda m: m["api"]),
    Column("Cluster", lambda m: m["cluster"]),
    Column("Leader", lambda m: "yes" if m["leader"] and m["status"] == "up" else ""),
    Column("Status", lambda m: m["status"]),
    Column("Last Seen", lambda m: m["last_seen"]),
]


@cmdline.command()
@format_option
def masters(fmt: str) -> None:
    """List the masters serving the cluster, and which one leads."""
    cmdline.echo(render(api_client().masters(), MASTER_COLUMNS, fmt))


@cmdline.command()
@label_filter
@format_option
def nodes(label: str, fmt: str) -> None:
    """List the cluster's nodes."""
    cmdline.echo(render(api_client().nodes(label=label), NODE_COLUMNS, fmt))


NETWORK_NODE_COLUMNS = [
    Column("Node Name", lambda n: n["name"]),
    Column("Address", lambda n: n["address"]),
    Column("VTEP", lambda n: n["vtep"]),
    Column("Mode", lambda n: n["mode"] or "--"),
]


@cmdline.command()
@format_option
def network(fmt: str) -> None:
    """Show the cluster network: its CIDR, how much of it is leased, each node's VTEP."""
    body = api_client().network()
    if fmt in ("json", "yaml"):
        cmdline.echo(render([body], [], fmt))
        return
    if fmt == "csv":
        cmdline.echo(render(body["nodes"], NETWORK_NODE_COLUMNS, fmt))
        return
    nat = "on" if body["nat"] else "off"
    cmdline.echo(
        f"Network {body['name']}: {body['cidr']} (VXLAN {body['vni']}, NAT {nat}), "
        f"{body['used']} of {body['size']} addresses leased ({body['instances']} instances)"
    )
    cmdline.echo(render(body["nodes"], NETWORK_NODE_COLUMNS, fmt))


@cmdline.group()
def node() -> None:
    """Node maintenance, as Incus: cordon, uncordon, drain, evacuate, restore; labels."""


@node.command()
@cmdline.argument("name")
def cordon(name: str) -> None:
    """Place no new instances on the node."""
    api_client().node_action(name, "cordon")
    cmdline.echo(f"Cordoned {name}")


@node.command()
@cmdline.argument("name")
def uncordon(name: str) -> None:
    """Place instances on the node again."""
    api_client().node_action(name, "uncordon")
    cmdline.echo(f"Uncordoned {name}")


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
            raise cmdline.BadParameter(f"{item!r}: use key=value to set, key- to remove")
    return changes


@node.command()
@cmdline.argument("name")
@cmdline.argument("labels", nargs=-1, required=True)
def label(name: str, labels: tuple[str, ...]) -> None:
    """Set labels on a node: k=v sets, k- removes (as kubectl label).

    They win over the labels the node reports of itself for placement, and its re-joins keep
    them; removing one lets the node's own label of that key count again.
    """
    try:
        changes = _label_changes(labels)
    except MultiverseError as exc:
        raise cmdline.BadParameter(exc.message) from exc
    item = api_client().label_node(name, changes)
    shown = ",".join(f"{k}={v}" for k, v in sorted(item["admin_labels"].items())) or "none"
    cmdline.echo(f"Labelled {name}; labels set by admins: {shown}")


def _ssh_credentials(identity: Path | None, password_stdin: bool) -> dict[str, str]:
    """The SSH login for the master to use: a key's text or a password read from stdin (never
    an argument: `ps` shows those). Sent in the request body, over TLS."""
    if identity is not None and password_stdin:
        raise cmdline.UsageError("give --identity or --password-stdin, not both")
    if identity is not None:
        try:
            return {"identity": identity.read_text()}
        except (OSError, UnicodeDecodeError) as exc:
            raise cmdline.BadParameter(f"cannot read {identity}: {exc}") from exc
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise cmdline.UsageError("--password-stdin read an empty password")
        return {"password": password}
    raise cmdline.UsageError("give --identity KEY (preferred) or --password-stdin")


ssh_login_options = [
    cmdline.option(
        "--identity",
        type=cmdline.Path(exists=True, dir_okay=False),
        help="Private key to log in with (preferred over a password).",
    ),
    cmdline.option(
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
@cmdline.argument("name")
@cmdline.option("--ssh", "target", required=True, help="The host: user@host[:port].")
@_with_ssh_login
@cmdline.option(
    "--host-key-fingerprint",
    default="",
    help="Trust this host key (SHA256:..., as `ssh-keygen -lf` prints it) instead of "
    "looking the host up in --known-hosts.",
)
@cmdline.option(
    "--known-hosts",
    type=cmdline.Path(dir_okay=False),
    default=lambda: Path.home() / ".ssh" / "known_hosts",
    show_default="~/.ssh/known_hosts",
    help="The host keys you trust; an unknown key is refused.",
)
@cmdline.option(
    "--driver",
    type=cmdline.Choice(["qemu", "firecracker", "multipass", "fake"]),
    default="qemu",
    show_default=True,
)
@cmdline.option("--labels", callback=labels_option, default="", help="Node labels: k=v,...")
@cmdline.option("--install-deps", is_flag=True, help="apt-get install the driver's packages too.")
@cmdline.option(
    "--root", default="/opt/multiverse", show_default=True, help="Install root on the host."
)
@with_wait
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
    client = api_client()
    operation = client.add_node(body)
    if no_wait:
        cmdline.echo(operation["id"])
        return
    done = wait_for(client, operation["id"], timeout, f"Installing {name}")
    service = (done["result"] or {}).get("service", "")
    cmdline.echo(f"Node {name} is Ready; its worker runs as {service}")


@node.command()
@cmdline.argument("name")
@cmdline.option("--force", is_flag=True, help="Also forget its instances (their VMs stay there).")
@cmdline.option(
    "--uninstall",
    is_flag=True,
    help="Also stop the worker `node add` installed and remove its unit, venv and data dir "
    "(over SSH: give --identity or --password-stdin).",
)
@_with_ssh_login
@cmdline.option("--timeout", type=cmdline.FloatRange(1), default=600, show_default=True)
def remove(
    name: str,
    force: bool,
    uninstall: bool,
    identity: Path | None,
    password_stdin: bool,
    timeout: float,
) -> None:
    """Forget a node and revoke its certificate; it can come back only with a new token."""
    client = api_client()
    if uninstall:
        if force:
            raise cmdline.UsageError("--uninstall needs the node's instances gone; no --force")
        operation = client.uninstall_node(name, _ssh_credentials(identity, password_stdin))
        wait_for(client, operation["id"], timeout, f"Uninstalling {name}")
        cmdline.echo(f"Removed {name}: its worker, unit, venv and data dir are gone")
        return
    client.remove_node(name, force)
    cmdline.echo(f"Removed {name}; its certificate is revoked")


def _maintain(
    action: str, name: str, no_wait: bool, timeout: float, fmt: str, mode: str = ""
) -> None:
    client = api_client()
    operation = client.node_action(name, action, {"mode": mode} if mode else None)
    if no_wait:
        cmdline.echo(operation["id"])
        return
    done = wait_for(client, operation["id"], timeout, f"{action.capitalize()} {name}")
    outcomes = done["result"] or []
    if fmt == "table" and not outcomes:
        cmdline.echo(f"{action}: nothing to do on {name}")
        return
    columns = [
        Column("Instance Name", lambda o: o["name"]),
        Column("Outcome", lambda o: o["outcome"]),
    ]
    cmdline.echo(render(outcomes, columns, fmt))


def _maintenance_command(action: str, summary: str) -> None:
    """``multiverse node ACTION NAME``: start the operation, wait, show each instance's fate."""

    def command(name: str, no_wait: bool, timeout: float, fmt: str) -> None:
        _maintain(action, name, no_wait, timeout, fmt)

    command.__doc__ = summary
    decorated = format_option(with_wait(command))
    node.command(name=action)(cmdline.argument("name")(decorated))


_maintenance_command("drain", "Cordon the node and stop its instances (restore starts them).")


@node.command()
@cmdline.argument("name")
@cmdline.option(
    "--mode",
    type=cmdline.Choice(["move", "recreate"]),
    default="move",
    show_default=True,
    help="move: with their disks; recreate: fresh instances from their specs (disks lost).",
)
@format_option
@with_wait
def evacuate(name: str, mode: str, no_wait: bool, timeout: float, fmt: str) -> None:
    """Cordon the node and move its instances, disks included, to other nodes."""
    _maintain("evacuate", name, no_wait, timeout, fmt, mode)


_maintenance_command(
    "restore", "Uncordon the node, bring evacuated instances back and start drained ones."
)
