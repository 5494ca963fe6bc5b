"""A private PostgreSQL for tests: its own cluster in a temporary directory, reached only on
a Unix socket there (no TCP port, no system service, no password), removed at the end.

PostgreSQL refuses to run as root, so under root the cluster belongs to ``nobody``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

USER = "multiverse"


def server_bin() -> Path | None:
    """The newest installed server's bin dir (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def private_postgres() -> Iterator[str]:
    """Start a cluster; yields its SQLAlchemy URL; stops it and removes its files."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: run scripts/host-deps.sh")
    # Short: a Unix socket's path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="mvpg-"))
    data = root / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "nobody")
        subprocess.run(
            _as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                       "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True,
        )  # fmt: skip
        options = f"-k {root} -c listen_addresses='' -c fsync=off -c max_connections=200"
        subprocess.run(
            _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                       "-l", str(root / "log"), "start"]),
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield f"postgresql://{USER}@/postgres?host={root}"
        finally:
            subprocess.run(
                _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                           "stop"]),
                capture_output=True,
            )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new, empty database in the cluster at ``url``; its URL."""
    import psycopg

    host = url.split("host=", 1)[1]
    with psycopg.connect(host=host, user=USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://{USER}@/{name}?host={host}"
