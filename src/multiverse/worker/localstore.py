"""The worker's own record of its VMs, in SQLite in its data directory.

It is what lets a restarted agent know which VMs are its own and what state each was in,
without asking the master, which may be away.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from multiverse.core.files import private_sqlite
from multiverse.core.model import InstanceSpec, InstanceState
from multiverse.core.network import Nic, Publish

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    ipv4 TEXT NOT NULL DEFAULT '',
    release TEXT NOT NULL DEFAULT ''
)
"""


@dataclass
class VMRecord:
    id: str
    spec: InstanceSpec
    state: InstanceState = InstanceState.CREATING
    version: int = 0
    message: str = ""
    ipv4: str = ""
    release: str = ""
    nic: Nic | None = None  # its interface on the cluster network, as the master leased it


class LocalStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(private_sqlite(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(vms)")}
        if "nic" not in columns:  # a data directory from before the cluster network
            self._db.execute("ALTER TABLE vms ADD COLUMN nic TEXT NOT NULL DEFAULT ''")
        # VM id -> its spec and the spec's JSON: a record is saved at every step of its VM,
        # and its spec, made once, was turned into JSON again each time.
        self._specs: dict[str, tuple[InstanceSpec, str]] = {}

    def load(self) -> list[VMRecord]:
        rows = self._db.execute(
            "SELECT id, spec, state, version, message, ipv4, release, nic FROM vms"
        )
        return [
            VMRecord(
                id=vm_id,
                spec=InstanceSpec(**json.loads(spec)),
                state=InstanceState(state),
                version=version,
                message=message,
                ipv4=ipv4,
                release=release,
                nic=_nic_from_json(nic),
            )
            for vm_id, spec, state, version, message, ipv4, release, nic in rows
        ]

    def save(self, record: VMRecord) -> None:
        known = self._specs.get(record.id)
        if known is None or known[0] is not record.spec:
            known = self._specs[record.id] = (record.spec, json.dumps(asdict(record.spec)))
        self._db.execute(
            "INSERT OR REPLACE INTO vms (id, spec, state, version, message, ipv4, release, nic)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                known[1],
                record.state.value,
                record.version,
                record.message,
                record.ipv4,
                record.release,
                json.dumps(asdict(record.nic)) if record.nic else "",
            ),
        )

    def remove(self, vm_id: str) -> None:
        self._specs.pop(vm_id, None)
        self._db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    def close(self) -> None:
        self._db.close()


def _nic_from_json(text: str) -> Nic | None:
    if not text:
        return None
    data = json.loads(text)
    data["publish"] = tuple(Publish(**item) for item in data.get("publish", ()))
    return Nic(**data)
