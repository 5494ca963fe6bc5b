"""What this host actually uses, for the dashboard's "used" bars next to "allocated".

The whole host, not the sum of its VMs: an operator reading a node card asks "is this machine
busy", and the host's own load (the worker, other tenants, page cache pressure) counts.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from multiverse.core.model import Usage


class HostUsage:
    """Measures on demand, at most once per ``max_age`` seconds; CPU is the busy share since
    the previous measure. Every report carries a measure, and during a launch storm a node
    reports each instance's every step: three reads of /proc each time, for a CPU share over
    a few milliseconds that says nothing anyway."""

    def __init__(self, data_dir: Path, max_age: float = 1.0) -> None:
        self.data_dir = data_dir
        self.max_age = max_age
        self._cores = psutil.cpu_count() or 1
        # psutil's CPU figure is relative to the previous call: this one starts the interval.
        psutil.cpu_times_percent(interval=None)
        self._last: tuple[float, Usage] | None = None

    def measure(self) -> Usage:
        moment = time.monotonic()
        if self._last is None or moment - self._last[0] >= self.max_age:
            self._last = (moment, self._measure())
        return self._last[1]

    def _measure(self) -> Usage:
        busy = 100.0 - psutil.cpu_times_percent(interval=None).idle
        memory = psutil.virtual_memory()
        return Usage(
            cpus=round(max(busy, 0.0) / 100.0 * self._cores, 2),
            # total - available, not psutil's "used": reclaimable cache is not in use.
            memory=memory.total - memory.available,
            disk=psutil.disk_usage(str(self.data_dir)).used,
        )
