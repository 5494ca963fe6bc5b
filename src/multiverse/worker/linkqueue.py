"""Link faults without netem: iptables hands the slowed path's packets to this process.

For kernels built without the netem (and prio) qdiscs. Bridged IPv4 goes through iptables'
FORWARD once bridge netfilter is on (``net.bridge.bridge-nf-call-iptables``, per network
namespace); a chain of ours, ``MV-LINK``, sends the packets bound for a slowed VM's tap (from
the fault's sources, or all) to an NFQUEUE, one queue per rule. A reader per queue, in the
agent's event loop, gives each packet its verdict: accepted after the delay (± jitter, none for
the reordered share), paced at the rate, dropped for the loss. NFQUEUE speaks plain netlink, so
the reader is a socket and a few structs (no C library).

Limits: no ``--duplicate`` (a verdict lets a packet go once); IPv4 only, as the netem path;
a packet is held in the kernel until its verdict, at most :data:`QUEUE_MAXLEN` per rule (more are
dropped, as netem's limit does); ``--queue-bypass`` lets traffic flow undelayed if the agent dies
(its restart re-applies). The chain, the bridge netfilter setting and the ``filter`` table, if
we made it, are undone when the last link fault goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multiverse.core.errors import DriverError, MultiverseError
from multiverse.core.faults import parse_duration, parse_percent

__all__ = ["CHAIN", "QUEUE_MAXLEN", "LinkQueue", "LinkQueues"]

log = logging.getLogger("multiverse.worker")

CHAIN = "MV-LINK"
QUEUE_BASE = 0x4D00  # our queue numbers: QUEUE_BASE + rule index
QUEUE_MAXLEN = 1000  # packets held per rule, as netem's default limit
BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
IPTABLES = "iptables-nft"  # the nf_tables flavour: its NFQUEUE goes through nft_compat

# linux/netfilter/nfnetlink.h and nfnetlink_queue.h
_NETLINK_NETFILTER = 12
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_SUBSYS_QUEUE = 3 << 8
_MSG_PACKET, _MSG_VERDICT, _MSG_CONFIG = _SUBSYS_QUEUE | 0, _SUBSYS_QUEUE | 1, _SUBSYS_QUEUE | 2
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN = 1, 2, 3
_CMD_BIND = 1
_COPY_PACKET = 2
_A_PACKET_HDR, _A_VERDICT_HDR, _A_PAYLOAD = 1, 2, 10
NF_DROP, NF_ACCEPT = 0, 1
_RATE_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = _NLM_F_REQUEST) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs  # nfgenmsg, version 0
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 0, 0) + body


def parse_rate(rate: str) -> float:
    """``1mbit`` → bits per second (tc's units: k is 1000)."""
    text = rate.strip().lower()
    for unit in sorted(_RATE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _RATE_UNITS[unit]
    raise DriverError(f"invalid rate {rate!r}")


class LinkQueue:
    """One NFQUEUE and what its packets undergo (the fault's delay, jitter, loss, reorder,
    rate); verdicts are sent from the event loop, the packets wait in the kernel."""

    def __init__(self, number: int, params: Mapping[str, str]) -> None:
        self.number = number
        if "duplicate" in params:
            raise DriverError(
                "--duplicate needs the netem qdisc (sch_netem), which this kernel lacks; its "
                "NFQUEUE fallback can delay, jitter, lose, reorder and pace packets, not copy them"
            )
        self.delay = parse_duration(params["delay"], "delay") if "delay" in params else 0.0
        self.jitter = parse_duration(params["jitter"], "jitter") if "jitter" in params else 0.0
        self.loss = parse_percent(params["loss"], "loss") / 100 if "loss" in params else 0.0
        self.reorder = (
            parse_percent(params["reorder"], "reorder") / 100 if "reorder" in params else 0.0
        )
        self.rate = parse_rate(params["rate"]) if "rate" in params else 0.0
        self._free_at = 0.0  # when the paced link is free again (rate)
        self._held: dict[int, asyncio.TimerHandle] = {}
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._random = random.Random()

    def open(self) -> None:
        """Bind the queue (copying each packet's first 4 bytes: the IPv4 total length)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            with contextlib.suppress(OSError):  # room for bursts; root may exceed rmem_max
                sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
            sock.bind((0, 0))
            attrs = (
                _attr(_CFG_CMD, struct.pack("!BxH", _CMD_BIND, socket.AF_INET))
                + _attr(_CFG_PARAMS, struct.pack("!IB", 4, _COPY_PACKET))
                + _attr(_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
            )
            sock.send(_message(_MSG_CONFIG, self.number, attrs, _NLM_F_REQUEST | _NLM_F_ACK))
            sock.settimeout(5)
            reply = sock.recv(65536)
            kind, error = (
                struct.unpack_from("=H", reply, 4)[0],
                struct.unpack_from("=i", reply, 16)[0],
            )
            if kind == _NLMSG_ERROR and error:
                raise OSError(-error, f"binding NFQUEUE {self.number}")
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise DriverError(f"cannot read NFQUEUE {self.number}: {exc}") from exc
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    def close(self) -> None:
        """Let the held packets go now, then unbind (closing the socket does)."""
        if self._sock is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        for packet, handle in list(self._held.items()):
            handle.cancel()
            self._verdict(packet, NF_ACCEPT)
        self._held.clear()
        self._sock.close()
        self._sock = None

    def _read(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # a burst at a time, then let the loop breathe
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: the kernel dropped what did not fit; go on
                return
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind == _MSG_PACKET:
                    self._packet(data[offset + 20 : offset + length])
                offset += (length + 3) & ~3

    def _packet(self, attrs: bytes) -> None:
        packet, size = -1, 0
        offset = 0
        while offset + 4 <= len(attrs):
            length, kind = struct.unpack_from("=HH", attrs, offset)
            if length < 4:
                break
            value = attrs[offset + 4 : offset + length]
            kind &= 0x3FFF
            if kind == _A_PACKET_HDR:
                packet = struct.unpack_from("!I", value)[0]
            elif kind == _A_PAYLOAD and len(value) >= 4:
                size = struct.unpack_from("!H", value, 2)[0]
            offset += (length + 3) & ~3
        if packet >= 0:
            self._schedule(packet, size)

    def _schedule(self, packet: int, size: int) -> None:
        """netem's order: lost, else paced, then delayed (the reordered share is not)."""
        if self.loss and self._random.random() < self.loss:
            self._verdict(packet, NF_DROP)
            return
        assert self._loop is not None
        now = self._loop.time()
        start = now
        if self.rate:  # sent once those before it are, at the rate; then it travels
            start = max(now, self._free_at) + size * 8 / self.rate
            self._free_at = start
        delay = self.delay
        if self.jitter:
            delay = max(0.0, delay + self._random.uniform(-self.jitter, self.jitter))
        if self.reorder and self._random.random() < self.reorder:
            delay = 0.0
        at = start + delay
        if at <= now:
            self._verdict(packet, NF_ACCEPT)
            return
        self._held[packet] = self._loop.call_at(at, self._release, packet)

    def _release(self, packet: int) -> None:
        self._held.pop(packet, None)
        self._verdict(packet, NF_ACCEPT)

    def _verdict(self, packet: int, verdict: int) -> None:
        if self._sock is None:
            return
        attrs = _attr(_A_VERDICT_HDR, struct.pack("!II", verdict, packet))
        with contextlib.suppress(OSError):  # the packet is gone already (queue flushed)
            self._sock.send(_message(_MSG_VERDICT, self.number, attrs))


class LinkQueues:
    """This node's link faults through iptables and NFQUEUE; ``state`` (kept by the caller in
    its state file) remembers what to restore, for an agent restarted mid-fault."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state  # "bridge_nf": the setting we found; "made_filter": we made the table
        self._queues: list[LinkQueue] = []
        self._applied: list[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]] | None = None

    @property
    def busy(self) -> bool:
        """Whether anything of ours may be in place (left by this agent or an earlier one)."""
        return bool(self.state) or bool(self._queues) or self._applied is None

    async def converge(self, rules: Sequence[tuple[str, Sequence[str], Mapping[str, str]]]) -> None:
        """Make the chain and the readers match ``rules``: (tap, sources, parameters) each."""
        wanted = [
            (tap, tuple(sources), tuple(sorted(params.items()))) for tap, sources, params in rules
        ]
        if wanted == self._applied:
            return
        queues = [
            LinkQueue(QUEUE_BASE + i, dict(params)) for i, (_t, _s, params) in enumerate(wanted)
        ]
        self._close_queues()
        if not wanted:
            await self._teardown()
            self._applied = []
            return
        await self._setup()
        await _iptables("-F", CHAIN)
        try:
            for queue, (tap, sources, _params) in zip(queues, wanted, strict=True):
                queue.open()  # before its rule: no packet waits for a reader that is not there
                self._queues.append(queue)
                match = ["-m", "physdev", "--physdev-out", tap]
                for source in sources or ("0.0.0.0/0",):
                    await _iptables("-A", CHAIN, *match, "-s", source, "-j", "NFQUEUE",
                                    "--queue-num", str(queue.number), "--queue-bypass")  # fmt: skip
        except MultiverseError:
            self._close_queues()
            await self._teardown()
            self._applied = []
            raise
        self._applied = wanted
        log.info("faults: %d link rule(s) through NFQUEUE (no netem in this kernel)", len(wanted))

    async def close(self) -> None:
        """The agent stops: readers go, the rules stay (bypassed) for its successor to adopt."""
        self._close_queues()

    def _close_queues(self) -> None:
        for queue in self._queues:
            queue.close()
        self._queues = []

    async def _setup(self) -> None:
        if not BRIDGE_NF.exists():
            raise DriverError(
                "link faults without netem need bridge netfilter (modprobe br_netfilter), "
                f"and {BRIDGE_NF} is missing"
            )
        if "bridge_nf" not in self.state:
            # iptables-nft makes its table on first use; ``-S`` would show it even if absent.
            self.state["made_filter"] = not await _ok("nft", "list", "table", "ip", "filter")
            self.state["bridge_nf"] = BRIDGE_NF.read_text().strip()
        _set_bridge_nf("1")
        if not await _iptables_ok("-S", CHAIN):
            await _iptables("-N", CHAIN)
        if not await _iptables_ok("-C", "FORWARD", "-j", CHAIN):
            await _iptables("-I", "FORWARD", "-j", CHAIN)

    async def _teardown(self) -> None:
        """Remove the chain, the table if we made it, and put bridge netfilter back."""
        while await _iptables_ok("-D", "FORWARD", "-j", CHAIN):
            pass
        if await _iptables_ok("-S", CHAIN):
            await _iptables("-F", CHAIN)
            await _iptables("-X", CHAIN)
        if self.state.get("made_filter") and not await _has_rules():
            await _run("nft", "delete", "table", "ip", "filter", check=False)
        if "bridge_nf" in self.state:
            _set_bridge_nf(str(self.state["bridge_nf"]))
        if self.state:
            log.info("faults: NFQUEUE link rules removed, bridge netfilter restored")
        self.state.clear()


def _set_bridge_nf(value: str) -> None:
    try:
        BRIDGE_NF.write_text(value + "\n")
    except OSError as exc:
        raise DriverError(f"cannot set {BRIDGE_NF} to {value}: {exc.strerror}") from exc


async def _has_rules() -> bool:
    """Whether the filter table holds any rule (ours gone): only then is it someone else's."""
    done = await _run(IPTABLES, "-w", "-S", check=False)
    return any(line.startswith("-A ") for line in done.splitlines())


async def _iptables(*args: str) -> None:
    await _run(IPTABLES, "-w", *args)


async def _iptables_ok(*args: str) -> bool:
    return await _ok(IPTABLES, "-w", *args)


async def _ok(*argv: str) -> bool:
    try:
        await _run(*argv)
    except DriverError:
        return False
    return True


async def _run(*argv: str, check: bool = True) -> str:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise DriverError(
            f"{argv[0]} is missing: link faults on a kernel without netem need iptables "
            "(apt-get install iptables)"
        ) from None
    out, err = await process.communicate()
    if check and process.returncode != 0:
        raise DriverError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")
