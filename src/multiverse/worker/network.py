"""This node's part of the cluster network: one bridge, a tap per VM, a VXLAN interface joining
the bridges of all nodes, nftables rules, and a dnsmasq serving the instances' names.

The master sends the plan (:class:`NetworkPlan`) with every sync acknowledgement; ``ensure``
converges the node to it and is cheap when nothing changed: each step measures, then acts.
Links go through netlink (pyroute2); the firewall is one nftables ruleset rendered from the
node's attachments and applied atomically with ``nft -f -``; names go into a hosts file that
dnsmasq rereads on SIGHUP.

The agent attaches a VM (its tap, anti-spoofing rules, published ports) before the driver boots
it and detaches it after it stops; the driver only receives the ready tap name and the MAC, as
Flintlock's network service hands its microVMs a ready interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from multiverse.core.errors import DriverError, Unavailable
from multiverse.core.network import (
    DNS_DOMAIN,
    VXLAN_OVERHEAD,
    NetworkPlan,
    Nic,
    Publish,
    parse_publish,
)
from multiverse.drivers.base import NetworkAttachment

__all__ = [
    "BRIDGE",
    "VXLAN",
    "Guarded",
    "LinuxNetwork",
    "NodeNetwork",
    "detect_mode",
    "render_ruleset",
    "tap_name",
]

log = logging.getLogger("multiverse.worker")

BRIDGE = "mvnet0"
VXLAN = "mvvx0"
VXLAN_PORT = 4789
NFT_TABLE = "multiverse"
_ZERO_MAC = "00:00:00:00:00:00"
_CAP_NET_ADMIN = 12


class NodeNetwork(Protocol):
    """The port the agent uses; every call converges and is idempotent."""

    async def ensure(self, plan: NetworkPlan) -> None:
        """Bridge, VXLAN and its forwarding entries, firewall and DNS as ``plan`` says."""

    async def attach(self, vm_id: str, nic: Nic) -> NetworkAttachment:
        """The VM's tap, plugged and guarded; counter-action: :meth:`detach`."""

    async def detach(self, vm_id: str) -> None:
        """Remove the VM's tap and its rules (its address stays leased on the master)."""


def detect_mode(requested: str) -> str:
    """``bridge`` when asked or (``auto``) when this process may build networks; else ``user``."""
    if requested in ("bridge", "user"):
        return requested
    return "bridge" if has_net_admin() and Path("/dev/net/tun").exists() else "user"


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (read from its effective capability set)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def tap_name(vm_id: str) -> str:
    """``mvt`` + 12 hex digits of the id: within Linux's 15 characters, stable per VM."""
    return "mvt" + hashlib.sha256(vm_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Guarded:
    """A plugged tap as the firewall sees it."""

    tap: str
    mac: str
    ip: str
    publish: tuple[Publish, ...] = ()


def render_ruleset(plan: NetworkPlan | None, guests: list[Guarded], bridge: str = BRIDGE) -> str:
    """The whole ``multiverse`` nftables state, replaced in one transaction.

    - bridge family, prerouting: a frame from a tap must carry that VM's MAC and, for IPv4 and
      ARP, its address; anything else (IPv6 included) is dropped, so a guest cannot take over
      another's address;
    - ip family: masquerade of the guests' outbound traffic (unless the network has NAT off)
      and DNAT of published node ports; no connection tracking for the overlay's packets
      and for traffic within the cluster network.
    """
    lines = [
        f"table bridge {NFT_TABLE}",
        f"delete table bridge {NFT_TABLE}",
        f"table bridge {NFT_TABLE} {{",
        "  chain guard {",
        "    type filter hook prerouting priority -200; policy accept;",
    ]
    for guest in guests:
        tap = f'iifname "{guest.tap}"'
        lines += [
            f"    {tap} ether saddr != {guest.mac} drop",
            f"    {tap} ether type arp arp saddr ether != {guest.mac} drop",
            f"    {tap} ether type arp arp saddr ip != {guest.ip} drop",
            f"    {tap} ether type ip ip saddr != {guest.ip} drop",
            f"    {tap} ether type != {{ ip, arp }} drop",
        ]
    lines += ["  }", "}", f"table ip {NFT_TABLE}", f"delete table ip {NFT_TABLE}"]
    lines += [f"table ip {NFT_TABLE} {{"]
    if plan is not None:
        # A nat chain turns connection tracking on for every packet of the namespace, bridged
        # ones too (br_netfilter); the overlay's own packets and traffic inside the cluster
        # network need no NAT, so they skip it: the data path stays that of a plain bridge.
        cidr = plan.network.cidr
        for chain, hook in (("raw_prerouting", "prerouting"), ("raw_output", "output")):
            lines += [
                f"  chain {chain} {{",
                f"    type filter hook {hook} priority raw; policy accept;",
                f"    udp dport {VXLAN_PORT} notrack",
                f"    ip saddr {cidr} ip daddr {cidr} notrack",
                "  }",
            ]
    lines += ["  chain postrouting {", "    type nat hook postrouting priority 100; policy accept;"]
    if plan is not None and plan.network.nat:
        cidr = plan.network.cidr
        lines.append(f'    ip saddr {cidr} ip daddr != {cidr} oifname != "{bridge}" masquerade')
    lines += ["  }"]
    dnat = [
        f"    fib daddr type local {p.protocol} dport {p.host_port} dnat to {g.ip}:{p.guest_port}"
        for g in guests
        for p in g.publish
    ]
    for chain, hook in (("prerouting", "prerouting"), ("output", "output")):
        lines += [f"  chain {chain} {{", f"    type nat hook {hook} priority -100; policy accept;"]
        lines += dnat
        lines += ["  }"]
    lines += ["}"]
    return "\n".join(lines) + "\n"


class LinuxNetwork:
    """The node network on Linux: pyroute2 for links, nft for rules, dnsmasq for names.

    What it made is kept in ``state_dir`` (the attachments, the plan, dnsmasq's hosts file and
    pid), so a restarted agent converges from where the last one stopped.
    """

    def __init__(self, state_dir: Path, *, bridge: str = BRIDGE, vxlan: str = VXLAN) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.bridge = bridge
        self.vxlan = vxlan
        self.plan: NetworkPlan | None = None
        self.mtu = 1500
        self.ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._guests: dict[str, Guarded] = _load_guests(state_dir / "attachments.json")
        self._applied_rules = ""

    # --- the port --------------------------------------------------------------------------

    async def ensure(self, plan: NetworkPlan) -> None:
        async with self._lock:
            await asyncio.to_thread(self._ensure_links, plan)
            self.plan = plan
            # Publishes can change while a VM runs: take them from the plan.
            for vm_id, nic in plan.nics.items():
                guest = self._guests.get(vm_id)
                if guest is not None and guest.publish != nic.publish:
                    self._guests[vm_id] = replace(guest, publish=nic.publish)
            await self._apply_rules()
            await asyncio.to_thread(self._ensure_dns, plan)
            self.ready.set()

    async def attach(self, vm_id: str, nic: Nic) -> NetworkAttachment:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout=60)
        except TimeoutError:
            raise Unavailable(
                "this node has not received the cluster network from the master yet"
            ) from None
        async with self._lock:
            tap = tap_name(vm_id)
            await asyncio.to_thread(self._ensure_tap, tap)
            self._guests[vm_id] = Guarded(tap, nic.mac, nic.ip, nic.publish)
            self._save_guests()
            await self._apply_rules()
            return NetworkAttachment(tap=tap, nic=nic, mtu=self.mtu)

    async def detach(self, vm_id: str) -> None:
        async with self._lock:
            tap = tap_name(vm_id)
            await asyncio.to_thread(self._remove_link, tap)
            if self._guests.pop(vm_id, None) is not None:
                self._save_guests()
                await self._apply_rules()

    # --- links (run in a thread: pyroute2 calls block) ----------------------------------------

    def _ensure_links(self, plan: NetworkPlan) -> None:
        from pyroute2 import IPRoute

        gateway = ipaddress.IPv4Interface(plan.gateway)
        with IPRoute() as ipr:
            underlay = _device_with_address(ipr, plan.underlay)
            if underlay is not None:
                self.mtu = _mtu(ipr, underlay) - VXLAN_OVERHEAD
            bridge = _lookup(ipr, self.bridge)
            if bridge is None:
                ipr.link("add", ifname=self.bridge, kind="bridge")
                bridge = _lookup(ipr, self.bridge)
                assert bridge is not None
            held = {
                (item.get("IFA_ADDRESS"), item["prefixlen"]) for item in ipr.get_addr(index=bridge)
            }
            for address, prefix in held - {(str(gateway.ip), gateway.network.prefixlen)}:
                ipr.addr("del", index=bridge, address=address, prefixlen=prefix)
            if (str(gateway.ip), gateway.network.prefixlen) not in held:
                ipr.addr(
                    "add", index=bridge, address=str(gateway.ip),
                    prefixlen=gateway.network.prefixlen,
                )  # fmt: skip
            ipr.link("set", index=bridge, mtu=self.mtu, state="up")
            if underlay is None:
                log.warning(
                    "no interface holds this node's underlay address %s: no VXLAN, "
                    "VMs reach only this node's VMs", plan.underlay,
                )  # fmt: skip
                return
            self._ensure_vxlan(ipr, plan, underlay, bridge)

    def _ensure_vxlan(self, ipr: Any, plan: NetworkPlan, underlay: int, bridge: int) -> None:
        vxlan = _lookup(ipr, self.vxlan)
        if vxlan is not None:
            info = ipr.get_links(vxlan)[0].get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
            if (
                info.get("IFLA_VXLAN_ID") != plan.network.vni
                or info.get("IFLA_VXLAN_LOCAL") != plan.underlay
            ):
                ipr.link("del", index=vxlan)
                vxlan = None
        if vxlan is None:
            ipr.link(
                "add", ifname=self.vxlan, kind="vxlan", vxlan_id=plan.network.vni,
                vxlan_local=plan.underlay, vxlan_link=underlay, vxlan_port=VXLAN_PORT,
            )  # fmt: skip
            vxlan = _lookup(ipr, self.vxlan)
        ipr.link("set", index=vxlan, master=bridge, mtu=self.mtu, state="up")
        # Head-end replication: one all-zero entry per peer floods broadcast and unknown
        # unicast to every other node; learning fills in the rest.
        entries = [
            (str(entry.get("NDA_LLADDR")), str(entry.get("NDA_DST")))
            for entry in ipr.fdb("dump", ifindex=vxlan)
            if entry.get("NDA_DST")
        ]
        present = {dst for mac, dst in entries if mac == _ZERO_MAC}
        wanted = set(plan.peers)
        for peer in sorted(wanted - present):
            ipr.fdb("append", ifindex=vxlan, lladdr=_ZERO_MAC, dst=peer)
        # A node that left takes its flood entry and what was learned behind it along.
        for mac, dst in entries:
            if dst not in wanted:
                ipr.fdb("del", ifindex=vxlan, lladdr=mac, dst=dst)
        if wanted != present:
            log.info("network: VXLAN peers now %s", ", ".join(sorted(wanted)) or "(none)")

    def _ensure_tap(self, tap: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = _lookup(ipr, tap)
            if index is None:
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                index = _lookup(ipr, tap)
            bridge = _lookup(ipr, self.bridge)
            if index is None or bridge is None:
                raise DriverError(f"cannot make tap {tap} on bridge {self.bridge}")
            ipr.link("set", index=index, master=bridge, mtu=self.mtu, state="up")

    def _remove_link(self, name: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = _lookup(ipr, name)
            if index is not None:
                ipr.link("del", index=index)

    # --- firewall --------------------------------------------------------------------------

    async def _apply_rules(self) -> None:
        rules = render_ruleset(self.plan, list(self._guests.values()), self.bridge)
        if rules == self._applied_rules:
            return
        await _nft(rules)
        self._applied_rules = rules
        if self.plan is not None and self.plan.network.nat:
            with contextlib.suppress(OSError):  # forwarding for the masquerade and DNAT
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    # --- names -----------------------------------------------------------------------------

    def _ensure_dns(self, plan: NetworkPlan) -> None:
        hosts = self.state_dir / "hosts"
        text = "".join(
            f"{address} {name} {name}.{DNS_DOMAIN}\n"
            for name, address in sorted(plan.records.items())
        )
        changed = not hosts.exists() or hosts.read_text() != text
        if changed:
            temporary = hosts.with_name("hosts.tmp")
            temporary.write_text(text)
            temporary.replace(hosts)
        gateway = str(ipaddress.IPv4Interface(plan.gateway).ip)
        pid = self._dns_pid()
        listening = (self.state_dir / "dnsmasq.listen").read_text() if pid else ""
        if pid and listening == gateway:
            if changed:
                os.kill(pid, signal.SIGHUP)  # dnsmasq rereads --addn-hosts
            return
        self._stop_dns()
        binary = _which("dnsmasq")
        if binary is None:
            log.warning("dnsmasq not found (install dnsmasq-base): no names for the VMs")
            return
        argv = [
            binary, "--keep-in-foreground", "--conf-file=/dev/null", "--user=root",
            f"--pid-file={self.state_dir / 'dnsmasq.pid'}", "--bind-interfaces",
            f"--listen-address={gateway}", "--no-hosts", f"--addn-hosts={hosts}",
            f"--domain={DNS_DOMAIN}", "--expand-hosts", f"--local=/{DNS_DOMAIN}/",
            "--domain-needed", "--bogus-priv",
        ]  # fmt: skip
        log_file = (self.state_dir / "dnsmasq.log").open("ab")
        with log_file:
            subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True,  # it serves the VMs, which outlive a killed agent
            )  # fmt: skip
        (self.state_dir / "dnsmasq.listen").write_text(gateway)

    def _dns_pid(self) -> int:
        try:
            pid = int((self.state_dir / "dnsmasq.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return 0
        return pid if b"dnsmasq" in cmdline and str(self.state_dir).encode() in cmdline else 0

    def _stop_dns(self) -> None:
        pid = self._dns_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _save_guests(self) -> None:
        path = self.state_dir / "attachments.json"
        data = {
            vm_id: {"tap": g.tap, "mac": g.mac, "ip": g.ip, "publish": [str(p) for p in g.publish]}
            for vm_id, g in self._guests.items()
        }
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
        temporary.replace(path)


def _load_guests(path: Path) -> dict[str, Guarded]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {
        vm_id: Guarded(
            item["tap"], item["mac"], item["ip"], tuple(parse_publish(p) for p in item["publish"])
        )
        for vm_id, item in data.items()
    }


def _lookup(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _device_with_address(ipr: Any, address: str) -> int | None:
    """The interface holding ``address``; None for loopback (one node alone: no overlay)."""
    try:
        if ipaddress.IPv4Address(address).is_loopback:
            return None
    except ValueError:  # a host name, or IPv6: no overlay on it
        return None
    found = ipr.get_addr(address=address)
    return int(found[0]["index"]) if found else None


def _mtu(ipr: Any, index: int) -> int:
    return int(ipr.get_links(index)[0].get("IFLA_MTU") or 1500)


def _which(program: str) -> str | None:
    """``program`` on PATH or in the sbin directories, which a non-login root PATH can miss."""
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


async def _nft(script: str) -> None:
    """Apply ``script`` with ``nft -f -``: all of it or nothing."""
    binary = _which("nft")
    if binary is None:
        raise DriverError("nft not found: install nftables")
    process = await asyncio.create_subprocess_exec(
        binary, "-f", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _out, err = await process.communicate(script.encode())
    if process.returncode != 0:
        raise DriverError(f"nft refused the network rules: {err.decode(errors='replace').strip()}")
