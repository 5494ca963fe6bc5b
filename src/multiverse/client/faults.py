"""``multiverse fault``: faults injected from outside the guests (partitions, slow links,
clocks, disks, pauses), listed and healed."""

from __future__ import annotations

from typing import Any

from multiverse.client import cmdline
from multiverse.client.cli import ago, api_client, format_option
from multiverse.client.output import Column, render, render_one

FAULT_COLUMNS = [
    Column("ID", lambda f: f["id"]),
    Column("Kind", lambda f: f["kind"]),
    Column("Target", lambda f: ",".join(f["targets"])),
    Column("Peers", lambda f: ",".join(f["peers"]) or "--"),
    Column("Params", lambda f: " ".join(f"{k}={v}" for k, v in f["params"].items()) or "--"),
    Column("Started", lambda f: ago(f["started_at"])),
    Column("Expires", lambda f: f["expires_at"] or "never"),
]


@cmdline.group()
def fault() -> None:
    """Inject faults from outside the guests: partitions, slow links, pauses, kills..."""


def _fault(fmt: str, body: dict[str, Any]) -> None:
    cmdline.echo(render_one(api_client().add_fault(body), FAULT_COLUMNS, fmt))


_fault_duration = cmdline.option("--duration", help="Heal by itself after this long (30s, 2m).")


def _split(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


_fault_env = cmdline.option("--env", help="Every instance of this environment (as env:NAME).")


def _fault_targets(name: str | None, env: str | None) -> list[str]:
    """NAME (an instance, env:NAME or KEY=VALUE) or --env, exactly one of them."""
    if bool(name) == bool(env):
        raise cmdline.UsageError("give an instance (or env:NAME, KEY=VALUE) or --env NAME")
    return [name] if name else [f"env:{env}"]


@fault.command(name="partition")
@cmdline.argument("sides", nargs=-1, required=True)
@cmdline.option("--one-way", is_flag=True, help="Cut only the first side's traffic to the second.")
@cmdline.option("--env", help="With one side only: the other side is the rest of this environment.")
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
        raise cmdline.UsageError(
            "give two sides separated by /: partition a,b / c,d (or a --env E)"
        )
    left, right = text.split("/")
    _fault(fmt, {"kind": "partition", "targets": _split(left), "peers": _split(right),
                 "one_way": one_way, "duration": duration})  # fmt: skip


@fault.command(name="link")
@cmdline.argument("name")
@cmdline.option("--to", "to", default="", help="Instances at the other end (default: all).")
@cmdline.option("--delay", help="e.g. 100ms")
@cmdline.option("--jitter", help="e.g. 20ms (with --delay)")
@cmdline.option("--loss", help="e.g. 5%")
@cmdline.option("--duplicate", help="e.g. 1%")
@cmdline.option("--reorder", help="e.g. 10% (with --delay)")
@cmdline.option("--rate", help="e.g. 1mbit")
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
    @cmdline.argument("name", required=False)
    @_fault_env
    @_fault_duration
    @format_option
    def command(name: str | None, env: str | None, duration: str | None, fmt: str) -> None:
        _fault(fmt, {"kind": kind, "targets": _fault_targets(name, env), "duration": duration})


_single("pause", "Freeze NAME (QMP stop) until healed or --duration is over.")
_single("kill", "Power NAME off hard; it stays desired running, so it comes back.")
_single("reboot", "Reset NAME hard, as the reset button.")


@fault.command(name="clock")
@cmdline.argument("name", required=False)
@_fault_env
@cmdline.option("--skew", help="Step the guest's clock, e.g. +5s or -2m.")
@cmdline.option("--drift", help="Run the guest's clock fast or slow, e.g. 100ppm or -50ppm.")
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
@cmdline.argument("name", required=False)
@_fault_env
@cmdline.option("--full", is_flag=True, help="Fill the data disk to the brim.")
@cmdline.option("--slow", help="Throttle the data disk to one I/O per this long, e.g. 10ms.")
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
    cmdline.echo(render(api_client().faults(), FAULT_COLUMNS, fmt))


@fault.command(name="heal")
@cmdline.argument("fault_id", required=False)
@cmdline.option("--all", "all_", is_flag=True, help="Heal every fault.")
@format_option
def fault_heal(fault_id: str | None, all_: bool, fmt: str) -> None:
    """Heal one fault by its id, or all of them."""
    if bool(fault_id) == all_:
        raise cmdline.UsageError("give a fault ID or --all")
    cmdline.echo(render(api_client().heal_fault(None if all_ else fault_id), FAULT_COLUMNS, fmt))
