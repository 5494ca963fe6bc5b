"""What the benchmarks share: a temp dir cleaned up however the run ends, Ctrl-C/SIGTERM that
unwind through every ``finally`` (so no VM or process is left), the host's load printed beside
the figures, and ``--format table|json``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

Report = dict[str, Any]


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C does, so every ``finally`` cleans up."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def print_load(report: Report) -> None:
    load = report["host_load_1min"]
    print(
        f"host: {os.cpu_count()} cpus, load average (1 min) {load['start']:.2f} at the start, "
        f"{load['end']:.2f} at the end"
    )


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """What every benchmark takes: ``--format table|json`` and ``--keep``."""
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) at the end")


def run_benchmark(
    name: str,
    args: Any,
    run: Callable[[Any, Path], Report],
    print_table: Callable[[Report], None],
) -> int:
    """Run ``run(args, root)`` in a fresh temp dir and print its report; the exit code."""
    root = Path(tempfile.mkdtemp(prefix=f"mv-bench-{name}-"))
    try:
        with interrupts_as_keyboard_interrupt():
            load_before = os.getloadavg()[0]
            report = run(args, root)
            # Other work on the host skews every figure: say how busy it was.
            report["host_load_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except BaseException:
        if args.keep:
            print(f"[{name}] logs kept in {root}", file=sys.stderr)
        raise
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        print_load(report)
    return 0
