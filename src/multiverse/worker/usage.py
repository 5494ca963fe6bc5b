"""What this host actually uses, for the dashboard's "used" bars next to "allocated".

The whole host, not the sum of its VMs: an operator reading a node card asks "is this machine
busy", and the host's own load (the worker, other tenants, page cache pressure) counts.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from multiverse.core.model import Usage


class HostUsage:
    """Measures on demand; CPU is the busy share since the previous measure."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._cores = psutil.cpu_count() or 1
        # psutil's CPU figure is relative to the previous call: this one starts the interval.
        psutil.cpu_times_percent(interval=None)

    def measure(self) -> Usage:
        busy = 100.0 - psutil.cpu_times_percent(interval=None).idle
        memory = psutil.virtual_memory()
        return Usage(
            cpus=round(max(busy, 0.0) / 100.0 * self._cores, 2),
            # total - available, not psutil's "used": reclaimable cache is not in use.
            memory=memory.total - memory.available,
            disk=psutil.disk_usage(str(self.data_dir)).used,
        )
