"""Shell benchmark: what ``multiverse shell`` costs a typist and a stream, against direct paths.

``multiverse shell NAME`` on a terminal, on the guest's node (as here, on loopback), with
OpenSSH installed, asks the master to let its key log in to the guest's SSH server for a few
seconds and then becomes ``ssh``: terminal -> OpenSSH -> QEMU's forwarded port -> the guest
(client/openssh.py). ``multiverse shell --no-ssh NAME``, and any shell where that cannot be
(another host, the fake driver), asks the master for a session (one HTTPS call: the master
checks the instance and gets a one-time ticket from the node's agent), then goes CLI (raw
terminal) -> WebSocket over TLS straight to the worker agent -> the driver's session: an SSH
channel with a PTY in the guest (qemu), or a local ``/bin/sh -i`` in a PTY on the worker
(fake). The master is not on the path of the bytes (it relays only when the CLI cannot reach
the node; not measured here). Each CLI path is checked to have gone the way its label says
(``MULTIVERSE_DEBUG=1``). Each of these is compared, in the same run and on the same machine,
with the most direct way to the same shell:

- qemu: plain SSH to the same guest (its forwarded port from the worker's
  ``qemu/vms/<uuid>/vm.json``, the node's key from ``qemu/ssh/id_ed25519``), with asyncssh (the
  library the agent uses) and with the OpenSSH client in a PTY when ``ssh`` is installed;
- fake: ``/bin/sh -i`` in a local PTY (what the fake driver runs, minus everything between).

The CLI and the OpenSSH client run in a real PTY (pexpect), exactly as a user runs them; bytes
are read straight off the PTY's file descriptor with select/read, the same way for every path.

Two figures per path:

- **keystroke round trip**: the far terminal runs ``stty raw -echo; dd bs=1 count=N``, a
  byte-for-byte echo; one byte is sent, the clock stops when it has come back, then the next
  byte goes. p50 and p99 over ``--keys`` keystrokes per path (default 1000) after 10 untimed
  ones. Every path's session is open at once and the keystrokes take turns between them (key
  *i* on each path before key *i+1*), so a burst of other work on this shared host lands on
  every path alike; with 1000 keys the p99 rests on the ten slowest, not on two.
- **throughput**: ``cat`` of a file of base64 text (``--megabytes`` of /dev/urandom, default 20,
  so about 27 MB of text) prepared beforehand in the guest, so the figure is the path's and not
  base64's speed on an emulated CPU; timed from sending the command until an end marker after
  the last byte arrived, in MB/s (10^6 bytes) of terminal output received. Each path streams
  ``--stream-rounds`` times (default 3), the paths taking turns in an order that rotates, and
  the figure is all its bytes over all its seconds: one stream per path, first to last, put
  whatever the host did in that minute on one path.

The cluster (master, a fake worker and/or a qemu worker) runs as real processes on loopback
through tests/harness.py in a temporary directory; the guest image comes from the shared cache
(``MULTIVERSE_IMAGE_CACHE``, default ``<repo>/.data/images``). Every session, VM and process is
cleaned up at the end, also on Ctrl-C, SIGTERM or failure.

    .venv/bin/python bench/shell.py [--driver qemu|fake|both] [--keys 1000] [--stream-rounds 3]
                                      [--format table|json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncssh
import pexpect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import add_report_options, run_benchmark  # noqa: E402
from harness import IMAGE_CACHE, Cluster, new_cluster  # noqa: E402  (tests/ is on the path now)

from multiverse.guest.image import TEST_IMAGE, build_test_image  # noqa: E402

WARMUP_KEYS = 10
ROWS, COLS = 24, 80
READ_SIZE = 65536
# Markers with characters outside the base64 alphabet, typed with a quote in the middle so
# that the echo of the typed command line never contains them.
SYNC, READY, END = b"@@mv-sync@@", b"@@mv-ready@@", b"@@mv-end@@"


def typed(marker: bytes) -> str:
    """``echo '@@mv-''sync@@'``: prints the marker; its own echo does not contain it."""
    text = marker.decode()
    return f"echo '{text[:5]}''{text[5:]}'"


def say(message: str) -> None:
    """Progress goes to stderr, so that ``--format json`` keeps stdout clean."""
    print(f"[shell] {message}", file=sys.stderr, flush=True)


class Terminal(Protocol):
    """The near end of an interactive session: bytes in, bytes out."""

    def send(self, data: bytes) -> None: ...

    def read(self, timeout: float) -> bytes:
        """What has arrived (at once if anything has), ``b""`` after ``timeout`` seconds of
        nothing; :class:`EOFError` once the session ended."""
        ...

    def close(self) -> None: ...


class PtyTerminal:
    """A program (the CLI, OpenSSH's client, /bin/sh) in a real PTY, driven with pexpect."""

    def __init__(self, command: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.child = pexpect.spawn(
            command, args, env=env, dimensions=(ROWS, COLS), timeout=30, echo=True
        )
        self.fd: int = self.child.child_fd

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, READ_SIZE)
        except OSError as error:  # EIO: the program on the PTY's other side is gone
            raise EOFError from error
        if not data:
            raise EOFError
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(b"exit\n")
            self.child.expect(pexpect.EOF, timeout=5)
        self.child.close(force=True)


class AsyncsshTerminal:
    """An SSH session with a PTY in the guest, from asyncssh, on a private event loop run from
    this thread (no thread hop between the timer and the socket)."""

    def __init__(self, port: int, key: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.connection = self.loop.run_until_complete(
            asyncssh.connect(
                "127.0.0.1",
                port,
                username="root",
                client_keys=[str(key)],
                known_hosts=None,
                agent_path=None,
                config=None,
                # As the agent does: the guest's dropbear makes a host key of the type asked
                # for on first use, and only ed25519 is quick to make on an emulated CPU.
                server_host_key_algs=["ssh-ed25519"],
            )
        )
        self.process = self.loop.run_until_complete(
            self.connection.create_process(
                encoding=None, term_type="xterm-256color", term_size=(COLS, ROWS)
            )
        )

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.loop.run_until_complete(self.process.stdin.drain())

    def read(self, timeout: float) -> bytes:
        try:
            data: bytes = self.loop.run_until_complete(
                asyncio.wait_for(self.process.stdout.read(READ_SIZE), timeout)
            )
        except TimeoutError:
            return b""
        if not data:
            raise EOFError
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stdin.write(b"exit\n")
            self.loop.run_until_complete(asyncio.wait_for(self.process.wait_closed(), 5))
        self.connection.close()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.wait_for(self.connection.wait_closed(), 5))
        self.loop.close()


# --- measuring ------------------------------------------------------------------------------


def expect(terminal: Terminal, marker: bytes, timeout: float = 60.0, seen: bytes = b"") -> None:
    """Read until ``marker`` has arrived (``seen``: what was read already)."""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"no {marker.decode()!r} within {timeout:.0f} s; got {seen[-300:]!r}"
            )
        seen = seen[-4096:] + terminal.read(left)


def drain(terminal: Terminal, quiet: float = 0.3) -> None:
    """Read until nothing came for ``quiet`` seconds."""
    while terminal.read(quiet):
        pass


def synchronise(terminal: Terminal) -> None:
    """Wait until the shell runs what we type, and nothing else is on its way."""
    terminal.send(f"{typed(SYNC)}\n".encode())
    expect(terminal, SYNC)
    drain(terminal)


def start_echo(terminal: Terminal, keys: int) -> None:
    """Put the far terminal in a raw byte-for-byte echo of ``keys`` bytes (and the warm-up)."""
    terminal.send(
        f"stty raw -echo; {typed(READY)}; dd bs=1 count={WARMUP_KEYS + keys} 2>/dev/null; "
        f"stty sane; {typed(SYNC)}\n".encode()
    )
    expect(terminal, READY)
    drain(terminal)


def keystroke(terminal: Terminal, key: bytes, last: bool) -> tuple[float, bytes]:
    """Seconds for one byte to come back from the echo, and what came after it (only the last
    key's echo may share a read with what the shell prints after dd)."""
    started = time.perf_counter()
    terminal.send(key)
    echoed = b""
    while not echoed:
        echoed = terminal.read(10.0)
        if not echoed and time.perf_counter() - started > 10.0:
            raise TimeoutError(f"keystroke {key!r} did not come back within 10 s")
    elapsed = time.perf_counter() - started
    if echoed[:1] != key or (len(echoed) > 1 and not last):
        raise RuntimeError(f"sent {key!r}, got {echoed!r} back")
    return elapsed, echoed[1:]


T = TypeVar("T")


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` starting at ``shift`` (modulo their number): whose turn comes first moves."""
    start = shift % len(items)
    return [*items[start:], *items[:start]]


def round_trips(terminals: list[Terminal], keys: int) -> list[list[float]]:
    """Seconds from sending each byte to a raw echo until it is back, ``keys`` bytes for each
    terminal, interleaved: key *i* goes to every terminal in turn (the order rotating with
    *i*) before key *i+1*, so that whatever else the host does at a moment falls on every
    path alike instead of on whichever was measured then."""
    for terminal in terminals:
        start_echo(terminal, keys)
    total = WARMUP_KEYS + keys
    timings: list[list[float]] = [[] for _ in terminals]
    after: list[bytes] = [b"" for _ in terminals]
    for index in range(total):
        key = bytes([ord("a") + index % 26])
        shift = index % len(terminals)
        for which in rotated(range(len(terminals)), shift):
            elapsed, after[which] = keystroke(terminals[which], key, index == total - 1)
            if index >= WARMUP_KEYS:
                timings[which].append(elapsed)
    for terminal, seen in zip(terminals, after, strict=True):
        expect(terminal, SYNC, seen=seen)
        drain(terminal)
    return timings


def throughput(terminal: Terminal, path: str) -> tuple[int, float]:
    """Bytes received and seconds taken for ``cat path`` and the end marker after it."""
    started = time.perf_counter()
    terminal.send(f"cat {path}; {typed(END)}\n".encode())
    received, tail = 0, b""
    while END not in tail[-4096:]:
        try:
            chunk = terminal.read(60.0)
        except EOFError:
            last = tail.decode(errors="replace").strip().splitlines()[-1:] or ["(nothing)"]
            raise StreamFailed(f"the session ended after {received} bytes: {last[0]}") from None
        if not chunk:
            raise StreamFailed(f"the stream stalled after {received} bytes")
        received += len(chunk)
        tail = (tail + chunk)[-8192:]
    elapsed = time.perf_counter() - started
    drain(terminal)
    return received, elapsed


class StreamFailed(Exception):
    """The throughput run broke off; the row says why instead of a figure."""


@dataclass
class Row:
    target: str  # the driver whose shell is reached: qemu or fake
    path: str
    p50_ms: float
    p99_ms: float
    mb_per_s: float | None  # None when the stream broke off: see stream_error
    stream_bytes: int
    keys: int
    stream_error: str = ""


def measure(target: str, paths: dict[str, Callable[[], Terminal]], args: Any) -> list[Row]:
    """Every path's session open at once, their keystrokes interleaved, then each one's stream
    on its own (a stream takes the host's whole CPU)."""
    terminals: dict[str, Terminal] = {}
    try:
        for label, open_terminal in paths.items():
            say(f"{target}: opening {label}")
            terminals[label] = open_terminal()
            synchronise(terminals[label])
        say(f"{target}: {args.keys} keystrokes on each path, in turn")
        timings = round_trips(list(terminals.values()), args.keys)
        streams = streamed(terminals, args.stream_file, args.stream_rounds, target)
        return [
            _row(target, label, seconds_each, *streams[label])
            for label, seconds_each in zip(terminals, timings, strict=True)
        ]
    finally:
        for terminal in terminals.values():
            terminal.close()


def streamed(
    terminals: dict[str, Terminal], path: str, rounds: int, target: str
) -> dict[str, tuple[int, float, str]]:
    """Bytes, seconds (summed over ``rounds`` streams) and error of each path. One path streams
    at a time, the order rotating from round to round, so that a slow minute of the host (or
    the guest's first read of the file) does not land on one path only."""
    labels = list(terminals)
    totals: dict[str, tuple[int, float, str]] = {label: (0, 0.0, "") for label in labels}
    for turn in range(rounds):
        for label in rotated(labels, turn):
            received, seconds, error = totals[label]
            if error:
                continue
            say(f"{target}: {label}: stream {turn + 1} of {rounds}")
            try:
                got, took = throughput(terminals[label], path)
                totals[label] = (received + got, seconds + took, "")
            except StreamFailed as failure:
                totals[label] = (0, 0.0, str(failure))
    return totals


def _row(
    target: str, label: str, timings: list[float], received: int, seconds: float, error: str
) -> Row:
    milliseconds = sorted(value * 1000 for value in timings)
    percentiles = statistics.quantiles(milliseconds, n=100, method="inclusive")
    row = Row(
        target=target,
        path=label,
        p50_ms=round(statistics.median(milliseconds), 3),
        p99_ms=round(percentiles[98], 3),
        mb_per_s=round(received / seconds / 1e6, 2) if seconds else None,
        stream_bytes=received,
        keys=len(timings),
        stream_error=error,
    )
    rate = f"{row.mb_per_s:.1f} MB/s" if row.mb_per_s is not None else f"stream FAILED: {error}"
    say(f"  {label}: p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms, {rate}")
    return row


# What `multiverse shell` says (MULTIVERSE_DEBUG=1) of the way its session went.
VIA_OPENSSH = b"debug: session through OpenSSH"
VIA_AGENT = b"debug: session straight to the node"


def cli_shell(cluster: Cluster, name: str, via: bytes, *options: str) -> Callable[[], Terminal]:
    """``multiverse shell NAME``, checked to have gone the way ``via`` names: a run where it
    fell back to another way would time that way under this one's label."""

    def open_terminal() -> Terminal:
        env = {**cluster.env, "MULTIVERSE_DEBUG": "1"}
        terminal = PtyTerminal(
            sys.executable, ["-m", "multiverse", "shell", *options, name], env
        )
        expect(terminal, via, timeout=30)
        return terminal

    return open_terminal


# --- the targets ----------------------------------------------------------------------------


def bench_fake(cluster: Cluster, args: argparse.Namespace, root: Path) -> list[Row]:
    cluster.start_worker("fake-node")
    cluster.ok("launch", "--name", "bench-fake", "--node", "fake-node")
    args.stream_file = str(root / "stream.b64")  # the fake's shell runs on this host
    prepare_stream(cluster, "bench-fake", args)
    try:
        local_env = {**os.environ, "PS1": "local$ ", "TERM": "xterm-256color"}
        return measure(
            "fake",
            {
                "multiverse shell": cli_shell(cluster, "bench-fake", VIA_AGENT),
                "local PTY /bin/sh": lambda: PtyTerminal("/bin/sh", ["-i"], local_env),
            },
            args,
        )
    finally:
        cluster.cli("delete", "bench-fake")


def bench_qemu(cluster: Cluster, args: argparse.Namespace, root: Path) -> list[Row]:
    say(f"guest image in {IMAGE_CACHE} (built if missing)")
    build_test_image(IMAGE_CACHE, progress=say)
    cluster.start_worker("qemu-node", driver="qemu", capacity="cpus=2,memory=4G,disk=20G")
    say("launching a VM")
    name = "bench-qemu"
    cluster.ok("launch", TEST_IMAGE, "--name", name, "--node", "qemu-node", "--memory",
               args.memory, "--disk", "1G", timeout=240)  # fmt: skip
    try:
        instance = cluster.instances()[name]
        state_dir = cluster.root / "qemu-node" / "qemu"
        runtime = json.loads((state_dir / "vms" / instance["id"] / "vm.json").read_text())
        port, key = int(runtime["ssh_port"]), state_dir / "ssh" / "id_ed25519"
        args.stream_file = "/tmp/mv-bench-stream.b64"
        prepare_stream(cluster, name, args)
        paths: dict[str, Callable[[], Terminal]] = {
            "multiverse shell": cli_shell(cluster, name, VIA_OPENSSH),
            "multiverse shell --no-ssh": cli_shell(cluster, name, VIA_AGENT, "--no-ssh"),
            "ssh (asyncssh)": lambda: AsyncsshTerminal(port, key),
        }
        ssh = shutil.which("ssh")
        if ssh:
            options = ["-F", "/dev/null", "-i", str(key), "-p", str(port), "-tt"]
            for option in (
                "IdentitiesOnly=yes",
                "HostKeyAlgorithms=ssh-ed25519",
                "BatchMode=yes",
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "LogLevel=ERROR",
            ):
                options += ["-o", option]
            openssh = [*options, "root@127.0.0.1"]
            paths["ssh (OpenSSH client)"] = lambda: PtyTerminal(ssh, openssh)
        else:
            say("no `ssh` client installed: the OpenSSH row is left out")
        return measure("qemu", paths, args)
    finally:
        cluster.cli("delete", name, timeout=60)


def prepare_stream(cluster: Cluster, name: str, args: argparse.Namespace) -> None:
    size = int(args.megabytes * 1_000_000)
    say(f"writing {args.megabytes:g} MB of random bytes as base64 to {args.stream_file} in {name}")
    script = f"head -c {size} /dev/urandom | base64 > {args.stream_file}"
    cluster.ok("exec", name, "--", "sh", "-c", script, timeout=600)


# --- running it -----------------------------------------------------------------------------


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rows: list[Row] = []
    (root / "cluster").mkdir()
    with new_cluster(root / "cluster") as cluster:
        say("starting a master")
        cluster.start_master()
        # The fake first: no idle VM burning emulated CPU next to it while it is measured.
        if args.driver in ("fake", "both"):
            rows += bench_fake(cluster, args, root)
        if args.driver in ("qemu", "both"):
            rows += bench_qemu(cluster, args, root)
    return {
        "keys": args.keys,
        "stream_megabytes_random": args.megabytes,
        "rows": [asdict(row) for row in rows],
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"Keystroke echo round trip ({report['keys']} keys) and stream throughput (base64 of "
        f"{report['stream_megabytes_random']:g} MB)"
    )
    print()
    header = f"{'driver':<7} {'path':<26} {'p50 ms':>8} {'p99 ms':>8} {'MB/s':>8}"
    print(header)
    print("-" * len(header))
    failures = []
    for row in report["rows"]:
        if row["mb_per_s"] is None:
            failures.append(row)
            rate = f"{'failed':>7}{len(failures)}"
        else:
            rate = f"{row['mb_per_s']:>8.1f}"
        print(
            f"{row['target']:<7} {row['path']:<26} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{rate}"
        )
    for number, row in enumerate(failures, 1):
        print(f"failed{number}: {row['target']} {row['path']}: {row['stream_error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--driver", choices=("qemu", "fake", "both"), default="both")
    parser.add_argument(
        "--keys", type=int, default=1000, help="timed keystrokes per path (default 1000)"
    )
    parser.add_argument(
        "--megabytes", type=float, default=20, help="random MB, base64-encoded, to stream"
    )
    parser.add_argument(
        "--stream-rounds", type=int, default=3, help="streams per path, taking turns (default 3)"
    )
    parser.add_argument("--memory", default="256M", help="the VM's memory (qemu)")
    add_report_options(parser)
    args = parser.parse_args()
    if args.keys < 2 or args.megabytes <= 0 or args.stream_rounds < 1:
        parser.error("--keys must be at least 2, --megabytes positive, --stream-rounds 1 or more")

    return run_benchmark("shell", args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
