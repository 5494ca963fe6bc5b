"""This node's part of the faults in force (issue 19), applied from outside the guests.

The master sends :class:`NodeFaults` with every sync acknowledgement and at once on a change;
:meth:`NodeFaultsApplier.converge` makes the node match it, and is cheap when nothing changed:

- partitions: one ``table bridge multiverse_faults`` dropping the listed (source, destination)
  pairs as frames enter the bridge (from a tap or from the VXLAN), replaced atomically with
  ``nft -f -``; the bridge family, because guest-to-guest traffic is bridged, not routed;
- links: on each slowed VM's tap a ``prio`` qdisc whose last band is the plain path, one netem
  band per rule and a u32 filter on the source address sending its packets there (pyroute2);
  on a kernel without those qdiscs (found at the first link fault: the qdisc kind is unknown),
  iptables sends those packets to an NFQUEUE read by this agent instead (:mod:`.linkqueue`);
- pause and disk slow are held (QMP ``stop``/``cont``, block throttling) while in force;
- kill, reboot and clock run once per fault and VM; those done are kept in ``faults.json`` so a
  restarted agent does not kill a VM again; clock is stepped back (its drift set back to
  nominal) and a filled disk emptied when the fault goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from multiverse.core.errors import DriverError, MultiverseError
from multiverse.core.faults import (
    FaultKind,
    LinkRule,
    NodeFaults,
    Shot,
    parse_duration,
    parse_ppm,
)
from multiverse.drivers.base import Driver, VMConfig
from multiverse.worker.linkqueue import LinkQueues

# The network's own nft runner (all or nothing): one way to apply rules on a node.
from multiverse.worker.network import _nft as nft
from multiverse.worker.network import tap_name

__all__ = ["FAULTS_TABLE", "NodeFaultsApplier", "render_drops"]

log = logging.getLogger("multiverse.worker")

FAULTS_TABLE = "multiverse_faults"
_ROOT = 0xFFFFFFFF  # TC_H_ROOT
_PRIO = 0x4D560000  # "MV": our root qdisc's handle, so we only ever remove our own
# Where a disk-full fault writes in the guest: on the data disk (/data in the test guest), else
# on the root file system's /var/tmp (not /tmp: often RAM).
_FILL_DIR = "$(grep -q ' /data ' /proc/mounts && echo /data || echo /var/tmp)"
_FILL = ".multiverse-fault-fill"
_ETH_P_IP = 0x0800


def render_drops(drops: tuple[tuple[str, str], ...]) -> str:
    """The whole fault table, replaced in one transaction; no drops: the table goes away."""
    lines = [f"table bridge {FAULTS_TABLE}", f"delete table bridge {FAULTS_TABLE}"]
    if drops:
        # After the anti-spoofing guard (-200): the sources here are the senders' own.
        lines += [f"table bridge {FAULTS_TABLE} {{", "  chain partition {",
                  "    type filter hook prerouting priority -190; policy accept;"]  # fmt: skip
        lines += [f"    ether type ip ip saddr {s} ip daddr {d} drop" for s, d in drops]
        lines += [f"    ether type arp arp saddr ip {s} arp daddr ip {d} drop" for s, d in drops]
        lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class NodeFaultsApplier:
    """Converges the node to :class:`NodeFaults`; what it did is kept in ``state_dir``."""

    def __init__(
        self, driver: Driver, vm_of: Callable[[str], VMConfig | None], state_dir: Path,
        *, networked: bool,
    ) -> None:  # fmt: skip
        self.driver = driver
        self.vm_of = vm_of  # instance id -> its VMConfig, None when not on this node
        self.networked = networked
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()
        state = _load(state_dir / "faults.json")
        self._drops: str | None = None  # rendered table last applied (None: unknown, re-apply)
        self._links: dict[str, list[list[Any]]] = state.get("links", {})  # tap -> rules
        # "fault id/instance id" -> shot (a fault may hit several VMs of this node); records
        # of an older agent were keyed by the fault id alone.
        self._held = {_key(_shot(r)): r for r in state.get("held", {}).values()}
        self._done = {_key(_shot(r)): r for r in state.get("done", {}).values()}
        self._generation = int(state.get("generation", 0))
        self._netem: bool | None = None  # whether the kernel has netem; None: not tried yet
        self._queues = LinkQueues(state.get("link_queues", {}))
        self._saved: str | None = None  # the file's text as this applier last wrote it

    async def converge(self, faults: NodeFaults) -> None:
        async with self._lock:
            if faults.generation < self._generation:
                return  # an acknowledgement computed before the latest change
            self._generation = faults.generation
            errors: list[str] = []
            try:
                if self.networked:
                    await self._converge_drops(faults.drops)
                    await self._converge_links(faults.links)
            except MultiverseError as exc:
                errors.append(exc.message)
            await self._converge_shots(faults.shots, errors)
            self._save()
            if errors:
                raise DriverError("; ".join(errors))

    # --- partitions -------------------------------------------------------------------------

    async def _converge_drops(self, drops: tuple[tuple[str, str], ...]) -> None:
        rules = render_drops(drops)
        if rules != self._drops:
            await nft(rules)
            self._drops = rules
            log.info("faults: %d partition drop rule(s) in force", len(drops))

    # --- links ------------------------------------------------------------------------------

    async def _converge_links(self, links: tuple[LinkRule, ...]) -> None:
        """netem where the kernel has it; else (and to undo what an earlier agent left there)
        the NFQUEUE fallback."""
        if self._netem is not False:
            try:
                await asyncio.to_thread(self._converge_netem, links)
            except _NoNetem:
                self._netem = False
                log.warning("faults: this kernel has no prio/netem qdisc: link faults go "
                            "through iptables and NFQUEUE")  # fmt: skip
        if self._netem is False or self._queues.busy:
            await self._queues.converge(
                [(tap_name(r.instance_id), r.sources, dict(r.params)) for r in links]
                if self._netem is False
                else []
            )

    def _converge_netem(self, links: tuple[LinkRule, ...]) -> None:
        if not links and not self._links:
            return
        wanted: dict[str, list[list[Any]]] = {}
        for rule in links:
            wanted.setdefault(tap_name(rule.instance_id), []).append(
                [rule.fault_id, list(rule.sources), [list(p) for p in rule.params]]
            )
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for tap in sorted(set(self._links) | set(wanted)):
                rules = wanted.get(tap, [])
                if self._links.get(tap) == rules:
                    continue
                index = ipr.link_lookup(ifname=tap)
                if not index:
                    continue  # the VM is not plugged (yet): retried with the next sync
                _clear_qdisc(ipr, index[0])
                self._links.pop(tap, None)
                if not rules:
                    continue
                try:
                    _install_netem(ipr, index[0], rules)
                except Exception as exc:  # pyroute2's NetlinkError: say what it means here
                    _clear_qdisc(ipr, index[0])
                    if getattr(exc, "code", None) == errno.ENOENT:  # "qdisc kind is unknown"
                        raise _NoNetem from exc
                    raise DriverError(
                        f"cannot put netem on {tap}: {exc} (does this kernel have the prio "
                        "and netem qdiscs, sch_prio and sch_netem?)"
                    ) from exc
                self._links[tap] = rules
                log.info("faults: netem on %s for %d rule(s)", tap, len(rules))

    # --- actions on VMs ---------------------------------------------------------------------

    async def _converge_shots(self, shots: tuple[Shot, ...], errors: list[str]) -> None:
        wanted = {_key(shot): shot for shot in shots}
        # Gone: undo what needs undoing, once.
        for key, record in list(self._held.items()) + list(self._done.items()):
            if key in wanted:
                continue
            shot = _shot(record)
            vm = self.vm_of(shot.instance_id)
            if vm is not None:
                await self._attempt(errors, shot, self._undo(shot, vm))
            self._held.pop(key, None)
            self._done.pop(key, None)
        for key, shot in wanted.items():
            if key in self._held or key in self._done:
                continue  # the VM process (paused, throttled) outlives a restarted agent
            vm = self.vm_of(shot.instance_id)
            if vm is None:
                continue
            if await self._attempt(errors, shot, self._do(shot, vm)):
                target = (
                    self._held if shot.kind in (FaultKind.PAUSE, FaultKind.DISK) else self._done
                )
                target[key] = {"fault_id": shot.fault_id, "kind": shot.kind.value,
                               "instance_id": shot.instance_id,
                               "params": [list(p) for p in shot.params]}  # fmt: skip
                log.info("faults: %s applied to %s", shot.kind.value, vm.name)

    async def _attempt(self, errors: list[str], shot: Shot, work: Awaitable[None]) -> bool:
        try:
            await work
        except MultiverseError as exc:
            errors.append(f"{shot.kind.value}: {exc.message}")
            return False
        return True

    async def _do(self, shot: Shot, vm: VMConfig) -> None:
        params = dict(shot.params)
        if shot.kind == FaultKind.PAUSE:
            await self.driver.pause(vm)
        elif shot.kind == FaultKind.KILL:
            await self.driver.stop(vm, force=True)
        elif shot.kind == FaultKind.REBOOT:
            await self.driver.reset(vm)
        elif shot.kind == FaultKind.CLOCK:
            if "drift" in params:
                await self._set_drift(vm, parse_ppm(params["drift"], "drift"))
            if "skew" in params:
                await self._step_clock(vm, parse_duration(params["skew"], "skew", signed=True))
        elif shot.kind == FaultKind.DISK:
            if params.get("slow"):
                await self.driver.throttle_disk(vm, _iops(params["slow"]))
            else:  # fill the data disk to the brim: dd ends with "no space left"
                await self._guest(
                    vm, f"dd if=/dev/zero of={_FILL_DIR}/{_FILL} bs=1M 2>/dev/null; sync; true"
                )

    async def _undo(self, shot: Shot, vm: VMConfig) -> None:
        params = dict(shot.params)
        if shot.kind == FaultKind.PAUSE:
            await self.driver.resume(vm)
        elif shot.kind == FaultKind.CLOCK:
            if "drift" in params:
                await self._set_drift(vm, 0.0)
            if "skew" in params:
                await self._step_clock(vm, -parse_duration(params["skew"], "skew", signed=True))
        elif shot.kind == FaultKind.DISK:
            if params.get("slow"):
                await self.driver.throttle_disk(vm, 0)
            else:
                await self._guest(vm, f"rm -f /data/{_FILL} /var/tmp/{_FILL}; sync")

    async def _step_clock(self, vm: VMConfig, seconds: float) -> None:
        await self._guest(vm, f"date -s @$(( $(date +%s) + {round(seconds)} )) >/dev/null")

    async def _set_drift(self, vm: VMConfig, ppm: float) -> None:
        """Run the guest's clock ``ppm`` fast (slow if negative); 0: nominal again.

        QEMU cannot change the rate of a running guest's clock (no QMP command; TCG's
        ``-icount`` and KVM's TSC scaling are fixed when the VM starts), so the guest kernel's
        own clock discipline does it, as NTP would: adjtimex(2) through the guest, like the
        skew's step. Whole 100 ppm go in the tick (µs per 1/100 s tick, 10000 nominal), the
        rest in the frequency (65536 units per ppm, at most ±500 ppm). The guest sees the
        setting (``adjtimex``) and an NTP daemon in it would fight it; healing sets the nominal
        tick and frequency back, not whatever the guest had before. Done once, as the step: a
        guest that reboots meanwhile comes back on time.
        """
        ticks = round(ppm / 100)
        frequency = round((ppm - ticks * 100) * 65536)
        try:
            await self._guest(vm, "command -v adjtimex >/dev/null")
        except MultiverseError:
            raise DriverError(
                f"{vm.name} has no adjtimex: --drift sets the guest kernel's clock rate with it "
                "(busybox or the adjtimex package), as QEMU cannot change a running guest's clock "
                "rate"
            ) from None
        await self._guest(vm, f"adjtimex -q -t {10000 + ticks} -f {frequency}")

    async def _guest(self, vm: VMConfig, script: str) -> None:
        code = 0
        async for chunk in self.driver.exec(vm, ["sh", "-c", script]):
            if chunk.exit_code is not None:
                code = chunk.exit_code
        if code != 0:
            raise MultiverseError(f"{script!r} failed in {vm.name} with exit code {code}")

    def _save(self) -> None:
        """Written when it changed only: every acknowledgement of every report converges,
        and a launch storm rewrote the same file for each one."""
        data = {"links": self._links, "held": self._held, "done": self._done,
                "generation": self._generation, "link_queues": self._queues.state}  # fmt: skip
        text = json.dumps(data, indent=2, sort_keys=True)
        if text == self._saved:
            return
        path = self.state_dir / "faults.json"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text)
        temporary.replace(path)
        self._saved = text


class _NoNetem(Exception):
    """The kernel does not know the prio or netem qdisc."""


def _key(shot: Shot) -> str:
    return f"{shot.fault_id}/{shot.instance_id}"


def _shot(record: dict[str, Any]) -> Shot:
    return Shot(
        record["fault_id"], FaultKind(record["kind"]), record["instance_id"],
        tuple((str(k), str(v)) for k, v in record["params"]),
    )  # fmt: skip


def _iops(slow: str) -> int:
    """``--slow 10ms``: one operation per 10 ms at most (QEMU throttles rates, not latency)."""
    return max(1, round(1 / parse_duration(slow, "--slow")))


def _clear_qdisc(ipr: Any, index: int) -> None:
    """Remove our root qdisc (and with it its bands and filters); others' are left alone."""
    for qdisc in ipr.get_qdiscs(index=index):
        if qdisc.get("parent") == _ROOT and qdisc.get("handle") == _PRIO:
            ipr.tc("del", index=index, handle=_PRIO, parent=_ROOT)


def _install_netem(ipr: Any, index: int, rules: list[list[Any]]) -> None:
    """prio with one netem band per rule; the last band (unfiltered traffic) is left as is."""
    bands = len(rules) + 1
    if bands > 16:
        raise MultiverseError("at most 15 link faults can end at one instance")
    ipr.tc("add", "prio", index=index, handle=_PRIO, parent=_ROOT, bands=bands,
           priomap=[bands - 1] * 16)  # fmt: skip
    for band, (_fault_id, sources, params) in enumerate(rules, start=1):
        classid = _PRIO | band
        ipr.tc("add", "netem", index=index, parent=classid, handle=(0x100 + band) << 16,
               **_netem(dict(params)))  # fmt: skip
        # The IPv4 source address is at offset 12 of the IP header; no sources: match all.
        keys = [f"0x{int(ipaddress.IPv4Address(s)):08x}/0xffffffff+12" for s in sources]
        for key in keys or ["0x0/0x0+12"]:
            ipr.tc("add-filter", "u32", index=index, parent=_PRIO, prio=band,
                   protocol=_ETH_P_IP, target=classid, keys=[key])  # fmt: skip


def _netem(params: dict[str, str]) -> dict[str, Any]:
    """pyroute2's netem options from the fault's (delay/jitter in µs, percentages as numbers)."""
    from multiverse.core.faults import parse_percent

    options: dict[str, Any] = {}
    for name in ("delay", "jitter"):
        if name in params:
            options[name] = int(parse_duration(params[name], name) * 1_000_000)
    for name, key in (("loss", "loss"), ("duplicate", "duplicate"), ("reorder", "prob_reorder")):
        if name in params:
            options[key] = parse_percent(params[name], name)
    if "rate" in params:
        options["rate"] = params["rate"].strip().lower()
    return options


def _load(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}
