"""The Store: every read and write of the master's state goes through here.

Every call is a coroutine that runs its (synchronous SQLAlchemy) work in the store's own thread
pool: a query or a commit's fsync never stalls the event loop that serves the API and the
workers' streams. That is the one way; SQLAlchemy's asyncio extension would need an async
driver per database and still run SQLite in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import ipaddress
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeAlias, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    and_,
    create_engine,
    event,
    false,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from multiverse.core.errors import (
    AlreadyExists,
    Conflict,
    MultiverseError,
    NotFound,
    Unschedulable,
)
from multiverse.core.faults import Fault, FaultKind
from multiverse.core.files import private_sqlite
from multiverse.core.images import ImageManifest, StoredImage
from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceState,
    Migration,
    MigrationKind,
    MigrationPhase,
    Node,
    NodeStatus,
    Resources,
    Usage,
)
from multiverse.core.network import ClusterNetwork, Lease, parse_publish
from multiverse.store import statements as sql
from multiverse.store.schema import (
    FaultRow,
    ImageLocationRow,
    ImageRow,
    InstanceRow,
    MasterRow,
    MigrationRow,
    NetworkRow,
    NodeRow,
    RevokedCertificateRow,
    TokenRow,
)

_LEASE_TRIES = 20
_AnyRow: TypeAlias = Row[*tuple[Any, ...]]  # a row of a Core query, columns by name


class LeasePicker(Protocol):
    """Chooses a lease in ``network`` (master/network.py): the addresses to try in turn, from
    the one after ``after`` (the generator raises a MultiverseError when none is left), and
    the lease of the one found free."""

    @property
    def network(self) -> str: ...

    def candidates(self, after: str) -> Iterator[str]: ...

    def lease(self, address: str) -> Lease: ...


_MIGRATIONS = Path(__file__).parent / "migrations"


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we write is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


Params = ParamSpec("Params")
Result = TypeVar("Result")
Item = TypeVar("Item")
THREADS = 4  # SQLite takes one writer at a time anyway; readers (the API) go alongside
IDS_AT_ONCE = 5000  # instance ids asked for in one statement
STALE_TRIES = 3  # runs of a call whose rows another call changed under it


def _off_loop(
    method: Callable[Concatenate[Store, Params], Result],
) -> Callable[Concatenate[Store, Params], Coroutine[Any, Any, Result]]:
    """``method`` as a coroutine that runs it in the store's thread pool."""

    def again_if_stale(store: Store, /, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        # Two calls run at once in the pool: one may read a row that the other deletes before
        # the first writes it back (an agent's answer about an instance a report just took
        # away). Its transaction is rolled back whole; run again, it sees the row gone.
        for attempt in range(STALE_TRIES):
            try:
                return method(store, *args, **kwargs)
            except StaleDataError:
                if attempt == STALE_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def run(store: Store, /, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        call = functools.partial(again_if_stale, store, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(store._pool, call)

    run.__doc__ = method.__doc__
    return run


def _in_turn(
    method: Callable[Concatenate[Store, Params], Result],
) -> Callable[Concatenate[Store, Params], Coroutine[Any, Any, Result]]:
    """``method`` run in the store's thread pool, one such call at a time, waiting for its
    turn on the event loop. These are the writes of instances and nodes that would otherwise
    wait for each other on a pool thread (the instance lock, SQLite's writer lock, polled
    with sleeps): at a thousand nodes they held every thread of the pool, and a page of
    ``GET /instances`` or a launch's read waited behind them for hundreds of milliseconds."""
    run = _off_loop(method)

    async def in_turn(store: Store, /, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        async with store._turn():
            return await run(store, *args, **kwargs)

    in_turn.__doc__ = method.__doc__
    return in_turn


class Store:
    """The master's database: SQLite file by default, any SQLAlchemy URL (PostgreSQL) with --db."""

    def __init__(self, url: str) -> None:
        self.url = url
        # psycopg 3 for postgresql:// (SQLAlchemy's default there is psycopg2).
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.engine: Engine = create_engine(url, pool_pre_ping=url.startswith("postgresql"))
        if url.startswith("sqlite"):
            if self.engine.url.database not in (None, "", ":memory:"):
                private_sqlite(Path(self.engine.url.database))  # it holds user data and tokens
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="store")
        self._leader: Connection | None = None  # holds the leader lock (PostgreSQL)
        # Taking what a node says of an instance reads the row, then writes, and so does an
        # update (a move's owner switch): two of them on two of the pool's threads must not
        # interleave, or the one written last wins on what it read before the other's write
        # (a source's report of its copy Deleting, read before the switch to the target and
        # written after it). PostgreSQL (several masters) also locks the rows (FOR UPDATE);
        # SQLite reads outside its write lock, so this does.
        self._instance_writes = threading.Lock()
        self._turns: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        # Token id -> (monotonic time read, record), for get_token(max_age=).
        self._tokens_read: dict[str, tuple[float, dict[str, Any]]] = {}
        # Network -> the address this store leased last there: the next lease looks on from it.
        self._leased: dict[str, str] = {}
        # Reports and agents' answers waiting to be taken, each with its caller's future
        # (take_report, observe_instance: _grouped).
        self._reports: list[tuple[_Report, asyncio.Future[ReportTaken]]] = []
        self._observations: list[tuple[tuple[str, dict[str, Any]], asyncio.Future[Change | None]]]
        self._observations = []
        self._revocations = 0

    def _turn(self) -> asyncio.Lock:
        """The event loop's lock of :func:`_in_turn` (a test may use the store from several
        loops, one after the other)."""
        loop = asyncio.get_running_loop()
        if self._turns is None or self._turns[0] is not loop:
            self._turns = (loop, asyncio.Lock())
        return self._turns[1]

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Store:
        return cls(f"sqlite:///{data_dir / 'multiverse.db'}")

    def migrate(self) -> None:
        """Bring the schema to the newest revision; a no-op when it is there already."""
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._drop_leader_connection()
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A transaction without the ORM, for the calls each launch and each report makes:
        the ORM's unit of work and identity map cost them two to three times the CPU of the
        statements themselves (README, Scaling)."""
        with self.engine.begin() as connection:
            yield connection

    # ---- nodes ----

    @_off_loop
    def add_node(self, node: Node, cert_serial: str) -> Node:
        row = NodeRow(
            id=node.id,
            name=node.name,
            address=node.address,
            driver=node.driver,
            labels=node.labels,
            admin_labels=node.admin_labels,
            status=node.status.value,
            cordoned=node.cordoned,
            cpus=node.capacity.cpus,
            memory=node.capacity.memory,
            disk=node.capacity.disk,
            cert_serial=cert_serial,
            version=node.version,
            last_sync=node.last_sync,
            created_at=now(),
            message=node.message,
            install=node.install,
        )
        try:
            with self._session() as session:
                session.add(row)
        except IntegrityError as exc:
            raise AlreadyExists(f"a node named {node.name!r} exists already") from exc
        return node

    @_off_loop
    def update_node(self, node_id: str, /, **fields: Any) -> None:
        """Set columns of one node; ``capacity``, ``used`` and ``status`` take core types."""
        if "capacity" in fields:
            capacity: Resources = fields.pop("capacity")
            fields.update(cpus=capacity.cpus, memory=capacity.memory, disk=capacity.disk)
        if "used" in fields:
            used: Usage = fields.pop("used")
            fields.update(used_cpus=used.cpus, used_memory=used.memory, used_disk=used.disk)
        if isinstance(fields.get("status"), NodeStatus):
            fields["status"] = fields["status"].value
        with self._session() as session:
            row = session.get(NodeRow, node_id)
            if row is None:
                raise NotFound(f"node {node_id} does not exist")
            for key, value in fields.items():
                setattr(row, key, value)

    @_off_loop
    def remove_node(self, node_id: str) -> None:
        """Forget a node and revoke its certificate (its instances must be gone first)."""
        with self._session() as session:
            row = session.get(NodeRow, node_id)
            if row is None:
                raise NotFound(f"node {node_id} does not exist")
            for instance in session.scalars(
                select(InstanceRow).where(InstanceRow.node_id == node_id)
            ):
                _release(session, instance.id)
                session.delete(instance)
            _release(session, node_id)
            if row.cert_serial:
                session.merge(
                    RevokedCertificateRow(
                        serial=row.cert_serial, node_name=row.name, revoked_at=now()
                    )
                )
            session.delete(row)

    @_off_loop
    def revoked_serials(self) -> set[str]:
        with self._session() as session:
            return set(session.scalars(select(RevokedCertificateRow.serial)))

    @_off_loop
    def get_node(self, node_id: str) -> Node:
        for node in self._list_nodes(ids=[node_id]):
            return node
        raise NotFound(f"node {node_id} does not exist")

    @_off_loop
    def find_node(self, name: str) -> Node:
        for node in self._list_nodes(names=[name]):
            return node
        raise NotFound(f"node {name!r} does not exist; `multiverse nodes` lists the nodes")

    def _list_nodes(
        self,
        ids: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        after: str | None = None,
        limit: int | None = None,
        silent: Mapping[NodeStatus, datetime] | None = None,
    ) -> list[Node]:
        """Nodes with what their instances take (allocated, kept on the row: no aggregation)
        and how many they hold, by name;
        ``labels`` match the effective ones (an admin's label wins over the node's own),
        ``after``/``limit`` give one page, and ``silent`` keeps the nodes of its statuses not
        heard from since the time it gives each (the health check's question, each second: not
        the thousand nodes that were heard from, nor those it already marked for how long
        they have been silent; an overloaded master reading every NotReady node every second
        fell further behind, and more nodes went NotReady)."""
        columns = sql.nodes.c
        query, params = sql.NODE_ROWS, {}
        if ids is not None:
            query, params = sql.NODES_BY_IDS, {"ids": list(ids)}
        if silent is not None:
            query = query.where(
                or_(
                    false(),
                    *(
                        and_(
                            columns.status == status.value,
                            or_(columns.last_sync.is_(None), columns.last_sync < since),
                        )
                        for status, since in silent.items()
                    ),
                )
            )
        if names is not None:
            query = query.where(columns.name.in_(names))
        for key, value in (labels or {}).items():
            admin = columns.admin_labels[key].as_string()
            query = query.where(
                or_(admin == value, and_(admin.is_(None), columns.labels[key].as_string() == value))
            )
        query = _page(query, columns.name, after, limit)
        with self._connection() as connection:
            moving = {row[0]: row[1:] for row in connection.execute(sql.MOVING_TO)}
            return [_node(row, moving) for row in connection.execute(query, params)]

    list_nodes = _off_loop(_list_nodes)

    # ---- instances ----

    async def add_instance(self, instance: Instance, lease: LeasePicker | None = None) -> Instance:
        """One placed instance, as :meth:`add_instances` records them."""
        return (await self.add_instances([(instance, lease)]))[0]

    @_in_turn
    def add_instances(
        self, placed: Sequence[tuple[Instance, LeasePicker | None]]
    ) -> list[Instance]:
        """Record placed instances and, with a lease, each one's address, in one transaction:
        a crash leaves all or none, and a launch of a hundred commits once. Their resources
        are taken on their nodes only if they still fit there (one conditional UPDATE of the
        node's row each, so two masters placing at once cannot both fill the last room:
        raises Unschedulable, and nothing is recorded). A lost race for an address (another
        master, another process) picks again."""
        for _attempt in range(_LEASE_TRIES):
            try:
                with self._connection() as connection:
                    return self._add_instances(connection, placed)
            except _AddressTaken:
                continue
        raise Conflict("could not lease an address: too many concurrent launches; try again")

    def _add_instances(
        self, connection: Connection, placed: Sequence[tuple[Instance, LeasePicker | None]]
    ) -> list[Instance]:
        # The room taken with one conditional UPDATE per node and size, run as one statement
        # of many, the rows written with one INSERT of many: on PostgreSQL a statement is a
        # round trip, and a launch of fifty made a hundred of them; each statement run alone
        # cost SQLAlchemy ~100 us of the master's CPU besides.
        taking = collections.Counter(
            (instance.node_id, instance.spec.resources)
            for instance, _ in placed
            if instance.node_id is not None
        )
        allocations = [sql.allocation(node, need, count) for (node, need), count in taking.items()]
        if allocations:
            rows = connection.execute(sql.ALLOCATE_IF_FITS, allocations).rowcount
            if rows != len(allocations):  # each UPDATE takes one row or none
                raise Unschedulable(
                    f"a node chosen for {placed[0][0].spec.name} has no room left (another "
                    "master placed there meanwhile)"
                )
        names = [instance.spec.name for instance, _ in placed]
        taken = sorted(connection.scalars(sql.NAMES_TAKEN, {"names": names})) if names[1:] else []
        if taken:
            raise AlreadyExists(f"names taken already: {', '.join(taken)}; choose others")
        try:
            connection.execute(sql.INSERT_INSTANCE, [_instance_values(i) for i, _ in placed])
        except IntegrityError as exc:
            raise AlreadyExists(
                f"an instance named {names[0]!r} exists already"
                if len(names) == 1
                else f"one of {', '.join(names)} was launched meanwhile"
            ) from exc
        for instance, lease in placed:
            if lease is not None:
                held = _take_lease(connection, instance.id, lease, self._leased)
                instance.address, instance.mac = held.address, held.mac
                instance.publish = tuple(str(item) for item in held.publish)
        return [instance for instance, _ in placed]

    # ---- the cluster network ----

    def get_network(self, name: str) -> ClusterNetwork | None:
        with self._session() as session:
            row = session.get(NetworkRow, name)
            if row is None:
                return None
            return ClusterNetwork(name=row.name, cidr=row.cidr, nat=row.nat, vni=row.vni)

    def put_network(self, network: ClusterNetwork) -> None:
        with self._session() as session:
            session.merge(
                NetworkRow(name=network.name, cidr=network.cidr, nat=network.nat, vni=network.vni)
            )

    @_off_loop
    def leases(self, network: str) -> list[Lease]:
        with self._connection() as connection:
            return [_lease(row) for row in connection.execute(sql.LEASES_IN, {"network": network})]

    @_off_loop
    def lease_of(self, owner: str) -> Lease | None:
        with self._connection() as connection:
            row = connection.execute(sql.LEASE_OF, {"owner": owner}).first()
            return _lease(row) if row is not None else None

    @_off_loop
    def sweep_leases(self) -> int:
        """Give back the addresses of instances that are gone, whichever way their rows went
        (every way this store deletes one releases its lease in the same transaction: this is
        the safety net, for rows removed by hand or by an older version); how many."""
        with self._connection() as connection:
            return connection.execute(sql.ORPHAN_LEASES).rowcount

    @_off_loop
    def ensure_lease(self, owner: str, lease: LeasePicker) -> Lease:
        """The owner's lease (a node's gateway address): the one it holds, else a new one."""
        for _attempt in range(_LEASE_TRIES):
            try:
                with self._connection() as connection:
                    row = connection.execute(sql.LEASE_OF, {"owner": owner}).first()
                    if row is not None:
                        return _lease(row)
                    return _take_lease(connection, owner, lease, self._leased)
            except _AddressTaken:
                continue
        raise Conflict("could not lease an address: too many concurrent requests; try again")

    @_off_loop
    def find_instance(self, name: str) -> Instance:
        found = self._list_instances(names=[name])
        if not found:
            raise NotFound(
                f"instance {name!r} does not exist; `multiverse instances` lists the instances"
            )
        return found[0]

    def _list_instances(
        self,
        names: Sequence[str] | None = None,
        node_id: str | None = None,
        ids: Sequence[str] | None = None,
        *,
        node_name: str | None = None,
        state: InstanceState | None = None,
        labels: Mapping[str, str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Instance]:
        """Instances by name, filtered; ``after``/``limit`` give one page (names are unique,
        so pages neither skip nor repeat while others launch and delete)."""
        if ids is not None and len(ids) > IDS_AT_ONCE:
            return _in_chunks(
                ids,
                lambda chunk: self._list_instances(
                    names, node_id, chunk, node_name=node_name, state=state, labels=labels
                ),
            )
        columns = sql.instances.c
        query, params = sql.INSTANCE_ROWS, {}
        if ids is not None:
            query, params = sql.INSTANCES_BY_IDS, {"ids": list(ids)}
        if names is not None:
            query = query.where(columns.name.in_(names))
        if node_id is not None:
            query = query.where(columns.node_id == node_id)
        if node_name is not None:
            query = query.where(sql.nodes.c.name == node_name)
        if state is not None:
            query = query.where(columns.state == state.value)
        for key, value in (labels or {}).items():
            query = query.where(columns.labels[key].as_string() == value)
        query = _page(query, columns.name, after, limit)
        with self._connection() as connection:
            return [_instance(row) for row in connection.execute(query, params)]

    @_off_loop
    def get_instance(self, instance_id: str) -> Instance:
        with self._connection() as connection:
            row = connection.execute(sql.INSTANCE_BY_ID, {"id": instance_id}).first()
        if row is not None:
            return _instance(row)
        raise NotFound(f"instance {instance_id} does not exist (deleted meanwhile?)")

    list_instances = _off_loop(_list_instances)

    @_off_loop
    def states_of(self, ids: Sequence[str]) -> dict[str, tuple[str, InstanceState, str]]:
        """Instance id -> its name, state and message, for those of ``ids`` that exist: what
        a wait for many asks again and again, without the rest of each row (a launch of
        fifty thousand, waited for, read every one whole every five seconds)."""
        with self._connection() as connection:
            return {
                row[0]: (row[1], InstanceState(row[2]), row[3] or "")
                for row in connection.execute(sql.STATES_OF, {"ids": list(ids)})
            }

    @_off_loop
    def standings(self, ids: Sequence[str] | None = None) -> list[Standing]:
        """Every instance's node, state and desired state, and nothing else of its row: the
        reconciler's full pass reads them all to find the few with work, then only those whole
        (at fifty thousand instances, every row whole, each turned into an Instance with its
        spec, was most of a second of the master's CPU, and nodes flapping made it a pass
        every two seconds). ``ids``: those instances only (a round of what changed)."""
        if ids is not None and len(ids) > IDS_AT_ONCE:
            return _in_chunks(ids, self._standings)
        return self._standings(ids)

    def _standings(self, ids: Sequence[str] | None) -> list[Standing]:
        query, params = sql.STANDINGS, {}
        if ids is not None:
            query, params = sql.STANDINGS_OF, {"ids": list(ids)}
        with self._connection() as connection:
            return [
                Standing(row[0], row[1], InstanceState(row[2]), DesiredState(row[3]))
                for row in connection.execute(query, params)
            ]

    @_in_turn
    def update_instance(self, instance_id: str, /, **fields: Any) -> None:
        for key in ("state", "desired"):
            if isinstance(fields.get(key), InstanceState | DesiredState):
                fields[key] = fields[key].value
        with self._instance_writes, self._session() as session:
            row = session.get(InstanceRow, instance_id, with_for_update=True)
            if row is None:
                raise NotFound(f"instance {instance_id} does not exist")
            moved = "node_id" in fields and fields["node_id"] != row.node_id
            if moved and row.node_id is not None:
                _allocate(session, row.node_id, _resources(row), count=-1)
            for key, value in fields.items():
                setattr(row, key, value)
            if moved and row.node_id is not None:
                _allocate(session, row.node_id, _resources(row))

    async def take_report(
        self,
        node_id: str,
        *,
        capacity: Resources,
        used: Usage,
        reported: Sequence[dict[str, Any]],
        removed: Sequence[str] | None,
        image_digests: Sequence[str] | None,
    ) -> ReportTaken:
        """A worker's report: the node is alive and Ready now, its cache holds
        ``image_digests`` (None: what the store has already), and its instances are as it
        says. ``removed`` None: the report is full (an instance missing from it is gone); else
        it is a delta naming only what changed and, in ``removed``, what went. A report older
        than what the master knows (lower ``version``) is ignored, so a report that crossed an
        action on the wire cannot undo it.

        Reports that arrive while the store is busy are taken together, in one transaction
        and one commit (group commit): in a launch storm each launch brings two or three
        reports from as many nodes, and a commit each (on PostgreSQL, a flush to disk each)
        was most of what taking them cost."""
        report = _Report(node_id, capacity, used, reported, removed, image_digests)
        return await self._grouped(self._reports, report, self._take_reports)

    async def _grouped(
        self,
        pending: list[tuple[Item, asyncio.Future[Result]]],
        item: Item,
        take: Callable[[list[Item]], Awaitable[Sequence[Result | Exception]]],
    ) -> Result:
        """``item`` taken by ``take`` together with those that joined ``pending`` while the
        store was busy: the first caller to get its turn takes them all, in one transaction."""
        taken: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        pending.append((item, taken))
        async with self._turn():
            if not taken.done():  # not in a batch taken meanwhile: this one takes them all
                batch = pending[:]
                pending.clear()
                results: Sequence[Result | Exception] = ()
                try:
                    results = await take([item for item, _ in batch])
                except Exception as exc:
                    results = [exc] * len(batch)
                finally:
                    _settle(batch, results)
        return await taken

    @_off_loop
    def _take_reports(self, reports: list[_Report]) -> list[ReportTaken | MultiverseError]:
        with self._instance_writes, self._connection() as connection:
            return [_take_report(connection, report) for report in reports]

    @_in_turn
    def take_heartbeats(self, beats: Mapping[str, Heartbeat]) -> list[str]:
        """Many nodes' reports that changed no instance, in one transaction: each node's
        capacity, usage and the time it was heard. Only Ready nodes take theirs; the ids of
        the others are returned (their status changed since their last whole report: found
        silent by the health check, removed), so that the caller takes their next report
        whole, which makes them Ready again with the transition that goes with it."""
        if not beats:
            return []
        with self._connection() as connection:
            connection.execute(
                sql.NODE_BEAT,
                [
                    sql.heard(node_id, beat.at, beat.capacity, beat.used)
                    for node_id, beat in beats.items()
                ],
            )
            found = connection.scalars(sql.READY_AMONG, {"ids": list(beats)})
            return sorted(set(beats) - set(found))

    async def observe_instance(self, instance_id: str, item: dict[str, Any]) -> Change | None:
        """Take one instance's status as an agent answered it (same rule as a report).
        Answers that arrive while the store is busy are taken together, as reports are: a
        launch of many has 64 agent calls open at once, and a transaction each (on
        PostgreSQL, a commit flushed to disk each, one at a time) held its dispatch to ~60
        instances a second."""
        return await self._grouped(self._observations, (instance_id, item), self._observe_instances)

    @_off_loop
    def _observe_instances(self, items: list[tuple[str, dict[str, Any]]]) -> list[Change | None]:
        changes: list[Change | None] = []
        with self._instance_writes, self._connection() as connection:
            for instance_id, item in items:
                row = connection.execute(sql.INSTANCE_OBSERVED, {"id": instance_id}).first()
                change, written = _observe(row, item) if row is not None else (None, None)
                _write_observed(connection, [written] if written else [])
                changes.append(change)
        return changes

    @_off_loop
    def mark_node_instances(self, node_id: str, state: InstanceState, message: str) -> list[Change]:
        """Set every instance of a node (a Down one) to ``state``; the node's next report,
        with versions no older than the ones known, puts the real states back."""
        changes = []
        with self._session() as session:
            rows = session.scalars(select(InstanceRow).where(InstanceRow.node_id == node_id))
            for row in rows:
                if row.state != state.value:
                    changes.append(Change(row.id, row.name, row.state, state.value))
                    row.state, row.message = state.value, message
        return changes

    # ---- migrations (moves) ----

    @_off_loop
    def add_migration(self, migration: Migration) -> Migration:
        """Record a move; refused while the instance has another one unfinished."""
        if self._active_migration(migration.instance_id) is not None:
            raise Conflict("the instance is being moved already; wait for that move to end")
        with self._session() as session:
            session.add(
                MigrationRow(
                    id=migration.id, instance_id=migration.instance_id,
                    kind=migration.kind.value, source_id=migration.source_id,
                    target_id=migration.target_id,
                    desired_after=migration.desired_after.value, phase=migration.phase.value,
                    attempts=migration.attempts, message=migration.message,
                    created_at=migration.created_at or now(),
                )
            )  # fmt: skip
        return self._get_migration(migration.id)

    def _get_migration(self, migration_id: str) -> Migration:
        with self._session() as session:
            row = session.get(MigrationRow, migration_id)
            if row is None:
                raise NotFound(f"move {migration_id} does not exist")
            return _migration(row)

    def _list_migrations(
        self, *, active: bool = False, instance_id: str | None = None
    ) -> list[Migration]:
        query = select(MigrationRow).order_by(MigrationRow.created_at)
        if active:
            query = query.where(MigrationRow.phase.not_in(sql.FINAL_PHASES))
        if instance_id is not None:
            query = query.where(MigrationRow.instance_id == instance_id)
        with self._session() as session:
            return [_migration(row) for row in session.scalars(query)]

    def _active_migration(self, instance_id: str) -> Migration | None:
        found = self._list_migrations(active=True, instance_id=instance_id)
        return found[0] if found else None

    @_off_loop
    def update_migration(self, migration_id: str, /, **fields: Any) -> Migration:
        with self._session() as session:
            row = session.get(MigrationRow, migration_id)
            if row is None:
                raise NotFound(f"move {migration_id} does not exist")
            for key, value in fields.items():
                setattr(row, key, value.value if isinstance(value, enum.Enum) else value)
        return self._get_migration(migration_id)

    get_migration = _off_loop(_get_migration)
    list_migrations = _off_loop(_list_migrations)
    active_migration = _off_loop(_active_migration)

    @_off_loop
    def delete_instance(self, instance_id: str) -> None:
        # Under the instance lock, as reports and answers are: one of them that read the row
        # before this delete would otherwise write to nothing and publish a change of an
        # instance gone.
        with self._instance_writes, self._connection() as connection:
            row = connection.execute(sql.INSTANCE_OBSERVED, {"id": instance_id}).first()
            if row is not None:
                _release(connection, row.id)
                _delete(connection, row)

    # ---- images ----

    @_off_loop
    def add_image(self, manifest: ImageManifest, aliases: Sequence[str] = ()) -> StoredImage:
        """Record an image whose blobs are in place; its name and aliases must be free."""
        taken = {ref for image in self._list_images() for ref in (image.name, *image.aliases)}
        clash = sorted(taken & {manifest.name, *aliases})
        if clash:
            raise AlreadyExists(f"an image named {clash[0]!r} exists already")
        row = ImageRow(
            digest=manifest.digest,
            name=manifest.name,
            aliases=list(aliases),
            kind=manifest.kind,
            architecture=manifest.architecture,
            size=manifest.size,
            manifest=manifest.to_json(),
            created_at=now(),
        )
        try:
            with self._session() as session:
                session.add(row)
        except IntegrityError as exc:
            raise AlreadyExists(f"image {manifest.digest} exists already") from exc
        return self._find_image(manifest.digest)

    def _list_images(self) -> list[StoredImage]:
        with self._session() as session:
            names = {row.id: row.name for row in session.scalars(select(NodeRow))}
            holders: dict[str, list[str]] = {}
            for location in session.scalars(select(ImageLocationRow)):
                if location.node_id in names:
                    holders.setdefault(location.digest, []).append(names[location.node_id])
            return [
                StoredImage(
                    manifest=ImageManifest.from_json(row.manifest),
                    aliases=tuple(row.aliases),
                    created_at=_utc(row.created_at),
                    nodes=tuple(sorted(holders.get(row.digest, []))),
                )
                for row in session.scalars(select(ImageRow).order_by(ImageRow.name))
            ]

    def _find_image(self, ref: str) -> StoredImage:
        """The image a name, an alias or a digest means."""
        for image in self._list_images():
            if image.answers_to(ref):
                return image
        raise NotFound(f"image {ref!r} does not exist; `multiverse image list` lists them")

    list_images = _off_loop(_list_images)
    find_image = _off_loop(_find_image)

    @_off_loop
    def delete_image(self, digest: str) -> None:
        with self._session() as session:
            row = session.get(ImageRow, digest)
            if row is not None:
                session.delete(row)
            for location in session.scalars(
                select(ImageLocationRow).where(ImageLocationRow.digest == digest)
            ):
                session.delete(location)

    # ---- faults ----

    @_off_loop
    def add_fault(self, fault: Fault) -> None:
        with self._session() as session:
            session.add(
                FaultRow(
                    id=fault.id, kind=fault.kind.value, targets=list(fault.targets),
                    peers=list(fault.peers), params=dict(fault.params), one_way=fault.one_way,
                    started_at=fault.started_at or now(), duration=fault.duration,
                )
            )  # fmt: skip

    @_off_loop
    def list_faults(self) -> list[Fault]:
        with self._session() as session:
            rows = session.scalars(select(FaultRow).order_by(FaultRow.started_at)).all()
            return [_fault(row) for row in rows]

    @_off_loop
    def remove_fault(self, fault_id: str) -> bool:
        """Whether it was there (a heal and an expiry may race: one of them wins)."""
        with self._session() as session:
            row = session.get(FaultRow, fault_id)
            if row is None:
                return False
            session.delete(row)
            return True

    # ---- tokens ----

    @_off_loop
    def add_token(
        self,
        token_id: str,
        kind: str,
        secret_hash: str,
        *,
        role: str = "",
        description: str = "",
        expires_at: datetime | None = None,
        uses_left: int | None = None,
    ) -> None:
        with self._session() as session:
            session.add(
                TokenRow(
                    id=token_id,
                    kind=kind,
                    role=role,
                    description=description,
                    secret_hash=secret_hash,
                    expires_at=expires_at,
                    uses_left=uses_left,
                    revoked=False,
                    created_at=now(),
                )
            )

    async def get_token(self, token_id: str, *, max_age: float = 0.0) -> dict[str, Any] | None:
        """The token's record; with ``max_age``, one this master read at most that many
        seconds ago will do. The API checks a token at every request, and that read was a
        store round trip of every launch; a token revoked through another master is then
        refused here within ``max_age`` (through this one, at once)."""
        if max_age > 0:
            read = self._tokens_read.get(token_id)
            if read is not None and time.monotonic() - read[0] < max_age:
                return read[1]
        moment, revocations = time.monotonic(), self._revocations
        record = await self._read_token(token_id)
        # Unknown ids are not kept (guesses are many), nor a read that a revocation on this
        # master may have overtaken.
        if max_age > 0 and record is not None and revocations == self._revocations:
            self._tokens_read[token_id] = (moment, record)
        return record

    @_off_loop
    def _read_token(self, token_id: str) -> dict[str, Any] | None:
        with self._session() as session:
            row = session.get(TokenRow, token_id)
            return _token(row) if row else None

    @_off_loop
    def list_tokens(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = select(TokenRow).order_by(TokenRow.created_at)
        if kind:
            query = query.where(TokenRow.kind == kind)
        with self._session() as session:
            return [_token(row) for row in session.scalars(query)]

    @_off_loop
    def consume_token_use(self, token_id: str) -> bool:
        """Count one use of a limited token; False when none is left (checked in one step)."""
        with self._session() as session:
            row = session.get(TokenRow, token_id)
            if row is None:
                return False
            if row.uses_left is None:
                return True
            if row.uses_left <= 0:
                return False
            row.uses_left -= 1
            return True

    @_off_loop
    def revoke_token(self, token_id: str) -> None:
        with self._session() as session:
            row = session.get(TokenRow, token_id)
            if row is None:
                raise NotFound(f"token {token_id} does not exist")
            row.revoked = True
        self._revocations += 1
        self._tokens_read.pop(token_id, None)

    # ---- masters and the leader lock ----

    @_off_loop
    def try_lead(self) -> bool:
        """Hold (or keep holding) the leader lock; False while another master holds it.

        PostgreSQL: a session advisory lock on a connection kept for it, released by the
        server when this process dies (its connection goes), so a standby takes over. SQLite
        has one master: it always leads."""
        if self.engine.dialect.name != "postgresql":
            return True
        try:
            if self._leader is None:
                self._leader = self.engine.connect()
            held = self._leader.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": _LOCK})
            self._leader.commit()
            return bool(held.scalar())
        except DBAPIError:
            self._drop_leader_connection()
            return False

    def _drop_leader_connection(self) -> None:
        if self._leader is not None:
            with contextlib.suppress(DBAPIError):
                self._leader.close()
            self._leader = None

    @_off_loop
    def heartbeat_master(self, master_id: str, api: str, cluster: str, leader: bool) -> None:
        """This master is alive (and leads or not) now; only one row says leader."""
        moment = now()
        with self._session() as session:
            if leader:
                session.execute(
                    update(MasterRow).where(MasterRow.id != master_id).values(leader=False)
                )
            row = session.get(MasterRow, master_id)
            if row is None:
                row = MasterRow(id=master_id, api=api, cluster=cluster, started_at=moment,
                                last_seen=moment)  # fmt: skip
                session.add(row)
            row.leader, row.last_seen = leader, moment

    @_off_loop
    def list_masters(self) -> list[dict[str, Any]]:
        with self._session() as session:
            return [
                {
                    "id": row.id,
                    "api": row.api,
                    "cluster": row.cluster,
                    "leader": row.leader,
                    "started_at": _utc(row.started_at),
                    "last_seen": _utc(row.last_seen),
                }
                for row in session.scalars(select(MasterRow).order_by(MasterRow.started_at))
            ]

    @_off_loop
    def forget_master(self, master_id: str) -> None:
        """A master stopping cleanly leaves; a killed one ages out of ``masters``."""
        with self._session() as session:
            row = session.get(MasterRow, master_id)
            if row is not None:
                session.delete(row)


_LOCK = 0x6D76_6C65  # "mvle": the advisory lock key of the leader


@dataclass(frozen=True)
class Change:
    """An instance's observed state moved (``new`` is "" when it was deleted)."""

    instance_id: str
    name: str
    old: str
    new: str


@dataclass(frozen=True)
class Standing:
    """Where an instance stands: all the reconciler needs to know whether it has work
    (:meth:`Store.standings`)."""

    id: str
    node_id: str | None
    state: InstanceState
    desired: DesiredState


@dataclass(frozen=True)
class Heartbeat:
    """A report that changed no instance: what it said of its node
    (:meth:`Store.take_heartbeats`)."""

    at: datetime
    capacity: Resources
    used: Usage


@dataclass(frozen=True)
class ReportTaken:
    """What the master learnt from one report (:meth:`Store.take_report`)."""

    name: str
    before: NodeStatus  # the node's status before this report made it Ready
    network_mode: str
    changes: list[Change]  # the instances' (state "" = deleted)


def _allocate(
    executor: Connection | Session,
    node_id: str,
    need: Resources,
    count: int = 1,
    *,
    fit: bool = False,
) -> bool:
    """Count ``count`` instances of ``need`` on the node (-1: give one back); with ``fit``,
    only if they fit its capacity (False then, and nothing changed)."""
    statement = sql.ALLOCATE_IF_FITS if fit else sql.ALLOCATE
    result = executor.execute(statement, sql.allocation(node_id, need, count))
    return bool(getattr(result, "rowcount", 0))


def _instance_values(instance: Instance) -> dict[str, Any]:
    """The row of a new instance, as ``sql.INSERT_INSTANCE`` takes it."""
    spec = instance.spec
    return dict(
        id=instance.id,
        name=spec.name,
        node_id=instance.node_id,
        cpus=spec.cpus,
        memory=spec.memory,
        disk=spec.disk,
        image=spec.image,
        user_data=spec.user_data,
        labels=spec.labels,
        desired=instance.desired.value,
        state=instance.state.value,
        ipv4=instance.ipv4,
        release=instance.release,
        message=instance.message,
        version=instance.version,
        created_at=instance.created_at or now(),
    )


def _resources(row: InstanceRow | _AnyRow) -> Resources:
    return Resources(row.cpus, row.memory, row.disk)


def _delete(connection: Connection, row: _AnyRow) -> None:
    """Delete the instance of ``row`` (read with ``sql.OBSERVED``), giving back its room."""
    if row.node_id is not None:
        _allocate(connection, row.node_id, _resources(row), count=-1)
    connection.execute(sql.DELETE_INSTANCE, {"id": row.id})


def _observe(row: _AnyRow, item: dict[str, Any]) -> tuple[Change | None, dict[str, Any] | None]:
    """What a node's ``item`` makes of the instance ``row``: the change of state, if any, and
    the values to write (None: nothing differs, or the item is older than what is known)."""
    if item["version"] < row.version:
        return None, None
    new = (item["state"], item["ipv4"], item["message"], item["version"],
           item.get("release") or row.release)  # fmt: skip
    if new == (row.state, row.ipv4, row.message, row.version, row.release):
        return None, None  # a whole report repeats what is known: no write
    state, ipv4, message, version, release = new
    written = {"row_id": row.id, "new_state": state, "new_ipv4": ipv4, "new_message": message,
               "new_version": version, "new_release": release}  # fmt: skip
    change = Change(row.id, row.name, row.state, state) if row.state != state else None
    return change, written


def _write_observed(connection: Connection, written: list[dict[str, Any]]) -> None:
    """The values :func:`_observe` chose, in one statement for all of them."""
    if written:
        connection.execute(sql.WRITE_OBSERVED, written)


Query = TypeVar("Query", bound=Select[*tuple[Any, ...]])


def _page(query: Query, key: Any, after: str | None, limit: int | None) -> Query:
    """One page of ``query`` (in ``key`` order already): the rows after ``after``, at most
    ``limit``."""
    if after is not None:
        query = query.where(key > after)
    return query.limit(limit) if limit is not None else query


def _migration(row: MigrationRow) -> Migration:
    return Migration(
        id=row.id, instance_id=row.instance_id, kind=MigrationKind(row.kind),
        source_id=row.source_id, target_id=row.target_id,
        desired_after=DesiredState(row.desired_after), phase=MigrationPhase(row.phase),
        attempts=row.attempts, message=row.message, bytes_done=row.bytes_done,
        bytes_total=row.bytes_total, created_at=_utc(row.created_at),
    )  # fmt: skip


class _AddressTaken(Exception):
    """Another transaction took the address first."""


def _take_lease(
    connection: Connection, owner: str, pick: LeasePicker, leased: dict[str, str]
) -> Lease:
    """Insert the lease of the first of ``pick``'s candidates that nobody holds (a lookup by
    key each), starting after the address ``leased`` says this store handed out last in that
    network. A launch read the network's every lease, and swept those of gone instances, before
    (100 ms a launch at 10,000 instances); the sweep is the reconciler's full pass now."""
    network = pick.network
    if network not in leased:  # the first lease of this process: go on after the highest held
        held = connection.scalars(sql.ADDRESSES_IN, {"network": network})
        leased[network] = max(held, key=ipaddress.IPv4Address, default="")
    for address in pick.candidates(leased[network]):
        if connection.execute(sql.LEASE_AT, {"network": network, "address": address}).first():
            continue
        chosen = pick.lease(address)
        try:
            connection.execute(
                sql.INSERT_LEASE,
                dict(
                    network=chosen.network, address=chosen.address, owner=owner,
                    kind=chosen.kind, mac=chosen.mac,
                    publish=",".join(str(item) for item in chosen.publish),
                ),
            )  # fmt: skip
        except IntegrityError as exc:  # another process took it meanwhile: choose again
            raise _AddressTaken from exc
        leased[network] = address
        return chosen
    raise AssertionError("unreachable: candidates() raises when it runs out")


def _release(executor: Connection | Session, owner: str) -> None:
    executor.execute(sql.RELEASE, {"owner": owner})


def _lease(row: _AnyRow) -> Lease:
    return Lease(
        network=row.network,
        address=row.address,
        owner=row.owner,
        kind=row.kind,
        mac=row.mac,
        publish=tuple(parse_publish(item) for item in row.publish.split(",") if item),
    )


def _apply_report(
    connection: Connection,
    node_id: str,
    reported: Sequence[dict[str, Any]],
    removed: Sequence[str] | None,
) -> list[Change]:
    by_id = {item["id"]: item for item in reported}
    if removed is None:
        rows = connection.execute(sql.NODE_INSTANCES, {"node": node_id})
    else:  # a delta: only the rows it speaks of are read
        named = {"node": node_id, "ids": [*by_id, *removed]}
        rows = connection.execute(sql.NODE_INSTANCES_NAMED, named)
    changes: list[Change] = []
    written = []
    for row in rows.all():
        item = by_id.get(row.id)
        if item is None:
            if row.desired == DesiredState.DELETED.value:
                _release(connection, row.id)
                _delete(connection, row)
                changes.append(Change(row.id, row.name, row.state, ""))
            continue
        change, values = _observe(row, item)
        if change:
            changes.append(change)
        if values:
            written.append(values)
    _write_observed(connection, written)
    return changes


@dataclass(frozen=True)
class _Report:
    """The arguments of one :meth:`Store.take_report`."""

    node_id: str
    capacity: Resources
    used: Usage
    reported: Sequence[dict[str, Any]]
    removed: Sequence[str] | None
    image_digests: Sequence[str] | None


def _in_chunks(ids: Sequence[str], read: Callable[[Sequence[str]], list[Item]]) -> list[Item]:
    """``read`` of ``ids``, a statement's worth at a time: a bound parameter each, and SQLite
    takes at most 32,766 in a statement, PostgreSQL 65,535."""
    return [
        found
        for start in range(0, len(ids), IDS_AT_ONCE)
        for found in read(ids[start : start + IDS_AT_ONCE])
    ]


def _settle(
    batch: list[tuple[Item, asyncio.Future[Result]]], results: Sequence[Result | Exception]
) -> None:
    """Give each caller of a batch its result; no results: the batch's taker was cancelled
    (the master is stopping), and the others are cancelled with it rather than left waiting."""
    for index, (_, waiting) in enumerate(batch):
        if waiting.done():  # its caller went away (its stream ended)
            continue
        if index >= len(results):
            waiting.cancel()
            continue
        result = results[index]
        if isinstance(result, Exception):
            waiting.set_exception(result)
        else:
            waiting.set_result(result)


def _take_report(connection: Connection, report: _Report) -> ReportTaken | MultiverseError:
    """One report of a batch; a node removed meanwhile fails its own report only (nothing
    written for it: its row is read first)."""
    node_id = report.node_id
    node = connection.execute(sql.NODE_OF_REPORT, {"node": node_id}).first()
    if node is None:
        return NotFound(f"node {node_id} does not exist")
    connection.execute(sql.NODE_REPORTED, sql.heard(node_id, now(), report.capacity, report.used))
    changes = _apply_report(connection, node_id, report.reported, report.removed)
    if report.image_digests is not None:
        _set_node_images(connection, node_id, report.image_digests)
    return ReportTaken(node.name, NodeStatus(node.status), node.network_mode, changes)


def _set_node_images(connection: Connection, node_id: str, digests: Sequence[str]) -> None:
    wanted = set(digests)
    held = set(connection.scalars(sql.IMAGES_AT, {"node": node_id}))
    if held == wanted:
        return
    if gone := held - wanted:
        connection.execute(sql.IMAGES_GONE, {"node": node_id, "digests": sorted(gone)})
    if new := wanted - held:
        rows = [{"digest": digest, "node_id": node_id} for digest in sorted(new)]
        connection.execute(sql.IMAGES_NEW, rows)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a crash of the master
    # loses nothing and the file stays consistent; a power loss may take back the last
    # transactions (the last second or so of launches and reports). FULL made every worker
    # report wait for an fsync. Deployments that want each commit on disk use PostgreSQL.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _node(row: _AnyRow, moving: Mapping[str, Sequence[Any]]) -> Node:
    """A node from a row of ``sql.NODE_ROWS``, unpacked by position in that statement's order;
    ``moving``: node id -> what instances moving there take meanwhile (``sql.MOVING_TO``'s
    count, cpus, memory, disk)."""
    (node_id, name, address, driver, status, labels, admin_labels, cpus, memory, disk,
     allocated_cpus, allocated_memory, allocated_disk, used_cpus, used_memory, used_disk,
     cordoned, last_sync, version, instance_count, network_mode, message,
     install) = row  # fmt: skip
    _, moving_cpus, moving_memory, moving_disk = moving.get(node_id, (0, 0, 0, 0))
    return Node(
        id=node_id,
        name=name,
        address=address,
        driver=driver,
        status=NodeStatus(status),
        labels=dict(labels),
        admin_labels=dict(admin_labels),
        capacity=Resources(cpus, memory, disk),
        allocated=Resources(
            allocated_cpus + int(moving_cpus),
            allocated_memory + int(moving_memory),
            allocated_disk + int(moving_disk),
        ),
        used=Usage(used_cpus, used_memory, used_disk),
        cordoned=cordoned,
        last_sync=_utc(last_sync),
        version=version,
        instance_count=instance_count,
        network_mode=network_mode,
        message=message,
        install=dict(install),
    )


def _instance(row: _AnyRow) -> Instance:
    """An instance from a row of ``sql.INSTANCE_ROWS`` (its columns, its node's name and its
    lease's, if it has one), unpacked by position in that statement's order."""
    (instance_id, name, node_id, node_name, cpus, memory, disk, image, user_data, labels,
     desired, state, ipv4, release, message, version, created_at, restarts, moved_from, held,
     address, mac, publish) = row  # fmt: skip
    return Instance(
        id=instance_id,
        spec=InstanceSpec(
            name=name,
            cpus=cpus,
            memory=memory,
            disk=disk,
            image=image,
            user_data=user_data,
            labels=dict(labels),
        ),
        node_id=node_id,
        node_name=node_name or "",
        desired=DesiredState(desired),
        state=InstanceState(state),
        ipv4=ipv4,
        release=release,
        message=message,
        version=version,
        created_at=_utc(created_at),
        restarts=restarts,
        moved_from=moved_from,
        held=held,
        address=address or "",
        mac=mac or "",
        publish=tuple(item for item in (publish or "").split(",") if item),
    )


def _fault(row: FaultRow) -> Fault:
    return Fault(
        id=row.id, kind=FaultKind(row.kind), targets=tuple(row.targets), peers=tuple(row.peers),
        params={str(k): str(v) for k, v in row.params.items()}, one_way=row.one_way,
        started_at=_utc(row.started_at), duration=row.duration,
    )  # fmt: skip


def _token(row: TokenRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "role": row.role,
        "description": row.description,
        "secret_hash": row.secret_hash,
        "expires_at": _utc(row.expires_at),
        "uses_left": row.uses_left,
        "revoked": row.revoked,
        "created_at": _utc(row.created_at),
    }
