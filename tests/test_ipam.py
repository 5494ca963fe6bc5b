"""Address management of the cluster network (master/network.py) over a real store: the pure
picker, the defaults that avoid the host's routes, and no address handed out twice under
concurrent launches, two masters on one database, or a master killed with SIGKILL mid-launch.
Also the pieces around it that need no VM: each node's plan, the nftables ruleset, and the
agent's use of the node network port (a recording fake)."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy
from harness import Cluster, wait_until

from multiverse.core.errors import Conflict, InvalidArgument, Unavailable
from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    NodeStatus,
    Resources,
)
from multiverse.core.network import (
    ClusterNetwork,
    NetworkPlan,
    Nic,
    Publish,
    mac_for,
    parse_cidr,
    parse_publish,
)
from multiverse.drivers.base import NetworkAttachment, VMConfig, VMStatus
from multiverse.drivers.fake import FakeDriver
from multiverse.master.events import EventBus
from multiverse.master.network import Ipam, Picker, choose_cidr, host_routes
from multiverse.master.reconciler import Reconciler
from multiverse.store.repository import Store, now
from multiverse.worker.agent import Agent
from multiverse.worker.localstore import LocalStore, VMRecord
from multiverse.worker.network import Guarded, render_ruleset

T = TypeVar("T")


def _wait(coroutine: Coroutine[Any, Any, T]) -> T:
    """A store call from these synchronous tests."""
    return asyncio.run(coroutine)


def _store(path: Path) -> Store:
    store = Store(f"sqlite:///{path / 'multiverse.db'}")
    store.migrate()
    return store


def _add(store: Store, ipam: Ipam, name: str, ip: str = "") -> Instance:
    instance = Instance(
        id=str(uuid.uuid4()),
        spec=InstanceSpec(name=name),
        node_id=None,
        desired=DesiredState.RUNNING,
        state=InstanceState.SCHEDULED,
        created_at=now(),
    )
    return _wait(store.add_instance(instance, ipam.picker(instance.id, requested=ip)))


def test_the_picker_offers_each_address_once_from_after_the_last_or_only_the_asked_one() -> None:
    pick = Picker("default", "10.9.0.0/29", "owner-1")
    assert list(itertools.islice(pick.candidates(), 6)) == [f"10.9.0.{i}" for i in range(1, 7)]
    after_three = list(itertools.islice(pick.candidates("10.9.0.3"), 6))
    assert after_three == ["10.9.0.4", "10.9.0.5", "10.9.0.6", "10.9.0.1", "10.9.0.2", "10.9.0.3"]
    assert next(pick.candidates("10.9.0.6")) == "10.9.0.1"  # the last one: round to the first
    assert next(pick.candidates("10.8.0.1")) == "10.9.0.1"  # not of this network (any more)
    with pytest.raises(Unavailable, match="no free address"):
        list(pick.candidates("10.9.0.2"))  # .0 and .7 are never offered; all six refused
    assert pick.lease("10.9.0.3").mac == mac_for("owner-1")
    assert Picker("default", "10.9.0.0/29", "n", kind="node").lease("10.9.0.1").mac == ""
    asked = Picker("default", "10.9.0.0/29", "owner-1", requested="10.9.0.5")
    offered = asked.candidates("10.9.0.1")
    assert next(offered) == "10.9.0.5"
    with pytest.raises(Conflict, match=r"10\.9\.0\.5 is taken"):
        next(offered)


def test_a_launch_looks_up_addresses_by_key_not_every_lease_and_wraps_round(db_url: str) -> None:
    """Next fit: after the first lease of the process, taking one reads no list of leases (it
    read all of them, and swept orphans, at every launch: 100 ms at 10,000 instances); an
    address given back is offered again once the search comes round to it. Both databases."""
    store, again = Store(db_url), Store(db_url)
    store.migrate()
    try:
        _next_fit(store, again)
    finally:
        store.close()
        again.close()


def _next_fit(store: Store, again: Store) -> None:
    ipam = Ipam.open(store, "10.9.0.0/29")
    statements: list[str] = []
    sqlalchemy.event.listen(
        store.engine, "before_cursor_execute",
        lambda _conn, _cursor, statement, *_: statements.append(statement),
    )  # fmt: skip
    added = [_add(store, ipam, f"vm-{index}") for index in range(5)]
    assert [i.address for i in added] == [f"10.9.0.{i}" for i in range(1, 6)]
    lease_reads = [s for s in statements if "FROM network_leases" in s]
    by_key = [s for s in lease_reads if "network_leases.address =" in s]
    assert len(lease_reads) == 1 + len(by_key)  # one whole read: the process's first lease
    assert not [s for s in statements if "NOT IN" in s]  # no sweep at launch
    _wait(store.delete_instance(added[1].id))  # 10.9.0.2 back
    assert _add(store, ipam, "vm-5").address == "10.9.0.6"  # on from the last, not back
    assert _add(store, ipam, "vm-6").address == "10.9.0.2"  # round, to the one given back
    with pytest.raises(Unavailable, match="no free address"):
        _add(store, ipam, "vm-7")
    held = ["vm-0", *(f"vm-{i}" for i in range(2, 7))]  # vm-7 refused whole, nothing half-made
    assert [i.name for i in _wait(store.list_instances())] == held
    # Another process (a restarted master) goes on after the highest address held.
    _wait(again.delete_instance(added[0].id))
    assert _add(again, Ipam.open(again), "vm-8").address == "10.9.0.1"


def test_the_reconcilers_full_pass_gives_back_the_addresses_of_instances_gone(
    tmp_path: Path,
) -> None:
    """Every delete of the store releases the lease in its transaction; a row removed any
    other way (by hand, an older version) leaves its address held until the full pass."""
    store = _store(tmp_path)
    ipam = Ipam.open(store, "10.9.0.0/29")
    kept, gone = _add(store, ipam, "kept"), _add(store, ipam, "gone")
    with store.engine.begin() as connection:
        connection.execute(sqlalchemy.text("DELETE FROM instances WHERE id = :id"), {"id": gone.id})
    reconciler = Reconciler(store, None, EventBus(), ipam)  # type: ignore[arg-type]
    _wait(reconciler.reconcile_all())
    assert [lease.owner for lease in _wait(store.leases("default"))] == [kept.id]
    assert _wait(ipam.sweep()) == 0


@pytest.mark.parametrize("bad", ["10.9.0.0", "10.9.0.7", "10.9.1.1", "nonsense", "10.9.0.1/29"])
def test_an_address_outside_the_usable_range_is_refused(bad: str, tmp_path: Path) -> None:
    ipam = Ipam.open(_store(tmp_path), "10.9.0.0/29")
    with pytest.raises(InvalidArgument):
        ipam.picker("x", requested=bad)


def test_the_default_network_avoids_the_hosts_routes(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    # /proc/net/route: 10.77.3.0/24 on eth0, and the default route.
    routes.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00034D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth0\t00000000\t01034D0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    found = host_routes(routes)
    assert found == [ipaddress.IPv4Network("10.77.3.0/24")]
    assert choose_cidr(found) == "10.78.0.0/16"
    assert choose_cidr([]) == "10.77.0.0/16"


def test_bad_networks_and_publishes_are_refused() -> None:
    for bad in ("10.0.0.1/16", "10.0.0.0/30", "fe80::/64", "x"):
        with pytest.raises(InvalidArgument):
            parse_cidr(bad)
    assert str(parse_publish("8080:80")) == "8080:80/tcp"
    for bad in ("8080", "0:80", "80:70000", "a:b", "1:2/icmp"):
        with pytest.raises(InvalidArgument):
            parse_publish(bad)


def test_the_network_is_fixed_at_the_first_start(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert Ipam.open(store, "10.9.0.0/24").network.cidr == "10.9.0.0/24"
    assert Ipam.open(store).network.cidr == "10.9.0.0/24"  # kept without --network
    with pytest.raises(InvalidArgument, match=r"10\.9\.0\.0/24 already"):
        Ipam.open(store, "10.10.0.0/24")
    assert Ipam.open(store, nat=False).network.nat is False


def test_fifty_concurrent_launches_on_two_masters_never_share_an_address(tmp_path: Path) -> None:
    stores = [_store(tmp_path), _store(tmp_path)]  # two masters on one database
    ipams = [Ipam.open(store, "10.9.0.0/24") for store in stores]
    start = threading.Barrier(50)

    def launch(index: int) -> str:
        start.wait()
        return _add(stores[index % 2], ipams[index % 2], f"vm-{index}").address

    with ThreadPoolExecutor(50) as pool:
        addresses = list(pool.map(launch, range(50)))
    assert len(set(addresses)) == 50
    leases = _wait(stores[0].leases("default"))
    assert sorted(lease.address for lease in leases) == sorted(addresses)
    held = {i.name: i.address for i in _wait(stores[1].list_instances())}
    assert set(held.values()) == set(addresses)


def test_an_address_is_freed_with_its_instance_and_taken_ones_are_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ipam = Ipam.open(store, "10.9.0.0/24")
    first, second = _add(store, ipam, "one"), _add(store, ipam, "two")
    assert (first.address, second.address) == ("10.9.0.1", "10.9.0.2")
    assert _wait(store.find_instance("one")).mac == mac_for(first.id)
    with pytest.raises(Conflict, match="taken"):
        _add(store, ipam, "three", ip="10.9.0.2")
    assert [i.name for i in _wait(store.list_instances())] == ["one", "two"]  # nothing half-made
    _wait(store.delete_instance(first.id))
    assert _add(store, ipam, "three", ip="10.9.0.1").address == "10.9.0.1"
    assert _wait(ipam.node_address("node-1")) == "10.9.0.3/24"
    assert _wait(ipam.node_address("node-1")) == "10.9.0.3/24"  # kept


@pytest.mark.parametrize("kill_after", [5])
def test_a_master_killed_during_fifty_launches_never_doubles_an_address(
    cluster: Cluster, kill_after: int
) -> None:
    cluster.start_master("--network", "10.9.0.0/24")
    cluster.start_worker("node-a", capacity="cpus=512,memory=1T,disk=100T")
    _as_bridged(cluster, "node-a")
    headers = {"Authorization": f"Bearer {cluster.token}"}
    launched = threading.Semaphore(0)

    def launch(index: int) -> int:
        body = {"name": f"vm-{index}", "memory": "16M", "disk": "16M"}
        try:
            answer = cluster.http.post(
                f"{cluster.api}/api/v1/instances", json=body, headers=headers
            )
        except httpx.HTTPError:
            return 0  # the master died under it
        launched.release()
        return answer.status_code

    with ThreadPoolExecutor(50) as pool:
        results = [pool.submit(launch, index) for index in range(50)]
        for _ in range(kill_after):
            launched.acquire(timeout=60)
        assert cluster.master is not None
        cluster.master.kill()  # SIGKILL, mid-flight
        codes = [result.result() for result in results]
    assert codes.count(202) >= kill_after
    cluster.start_master()
    wait_until(lambda: cluster.node("node-a").get("status") == "Ready", timeout=30)
    for index in range(50, 55):  # and it goes on handing out free ones
        cluster.ok("launch", "--name", f"vm-{index}", "--memory", "16M", "--disk", "16M")
    instances = cluster.ok("instances", "--format", "json").json()
    addresses = [i["address"] for i in instances]
    assert all(addresses) and len(set(addresses)) == len(addresses)
    network = cluster.ok("network", "--format", "json").json()[0]
    assert network["instances"] == len(instances)  # no lease left without its instance


def _as_bridged(cluster: Cluster, name: str) -> None:
    """Mark a fake worker's node as on the cluster network, as a bridge-mode worker's join
    does (a fake worker builds no network: it joins in user mode, whose VMs get no lease)."""
    store = Store.for_data_dir(cluster.root / "master")
    try:
        _wait(store.update_node(_wait(store.find_node(name)).id, network_mode="bridge"))
    finally:
        store.close()


def test_instances_of_a_user_mode_node_get_no_lease_and_show_their_own_address(
    cluster: Cluster,
) -> None:
    """Its VMs are on QEMU's NAT, not the cluster network: an address leased for them would be
    shown by ``instances`` and ``info`` while the guest has another."""
    cluster.start_master("--network", "10.9.0.0/24")
    cluster.start_worker("node-u")
    assert cluster.node("node-u")["network_mode"] == "user"
    cluster.ok("launch", "--name", "vm-u", "--memory", "16M", "--disk", "16M")
    row = cluster.instances()["vm-u"]
    assert row["address"] == "" and row["mac"] == "" and row["ipv4"]  # the driver's own
    info = cluster.ok("info", "vm-u", "--format", "json").json()[0]
    assert info["address"] == "" and info["ipv4"] == row["ipv4"]
    assert cluster.ok("network", "--format", "json").json()[0]["used"] == 0
    # A given address or a published port needs a node on the network: refused, clearly.
    for flag in (("--ip", "10.9.0.9"), ("--publish", "8080:80")):
        refused = cluster.cli("launch", "--name", "vm-x", *flag)
        assert refused.code != 0 and "user mode" in refused.err, refused.err
    assert "vm-x" not in cluster.instances()


def _node(store: Store, name: str, address: str, mode: str, status: NodeStatus) -> Node:
    node = Node(
        id=str(uuid.uuid4()), name=name, address=f"{address}:1339", driver="qemu",
        status=status, labels={}, capacity=Resources(8, 8 << 30, 100 << 30),
    )  # fmt: skip
    _wait(store.add_node(node, cert_serial=""))
    _wait(store.update_node(node.id, network_mode=mode))
    return node


def test_each_node_plan_names_its_live_bridged_peers_and_its_instances(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ipam = Ipam.open(store, "10.9.0.0/24")
    a = _node(store, "a", "192.0.2.1", "bridge", NodeStatus.READY)
    _node(store, "b", "192.0.2.2", "bridge", NodeStatus.READY)
    _node(store, "down", "192.0.2.3", "bridge", NodeStatus.DOWN)  # left: no more flooding to it
    user = _node(store, "u", "192.0.2.4", "user", NodeStatus.READY)
    on_a = _add(store, ipam, "web-1")
    _wait(store.update_instance(on_a.id, node_id=a.id))
    on_user = _add(store, ipam, "db-1")
    _wait(store.update_instance(on_user.id, node_id=user.id))
    plan = _wait(ipam.plan(a.id))
    assert plan.underlay == "192.0.2.1" and plan.peers == ("192.0.2.2",)
    assert plan.gateway == _wait(ipam.node_address(a.id))
    assert plan.records == {"web-1": on_a.address}  # db-1's node is not on the network
    nic = plan.nics[on_a.id]
    assert (nic.address, nic.mac) == (f"{on_a.address}/24", on_a.mac)
    assert nic.gateway == nic.dns == plan.gateway.split("/")[0]
    _wait(store.remove_node(a.id))  # its address and its instances' go back
    owners = {lease.owner for lease in _wait(store.leases("default"))}
    assert a.id not in owners and on_a.id not in owners and on_user.id in owners


def test_the_plans_of_one_moment_share_one_read_of_the_cluster(tmp_path: Path) -> None:
    # Every sync acknowledgement of a bridged node carries its plan: a thousand nodes must not
    # make a thousand reads of every node and instance.
    store = _store(tmp_path)
    ipam = Ipam.open(store, "10.9.0.0/24")
    nodes = [
        _node(store, f"n{i}", f"192.0.2.{i + 1}", "bridge", NodeStatus.READY) for i in range(3)
    ]
    web = _add(store, ipam, "web-1")
    _wait(store.update_instance(web.id, node_id=nodes[0].id))
    reads = 0
    list_instances = store.list_instances

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await list_instances(*args, **kwargs)

    store.list_instances = counted  # type: ignore[method-assign]

    async def plans() -> list[Any]:
        return await asyncio.gather(*(ipam.plan(node.id) for node in nodes * 10))

    made = _wait(plans())
    assert reads == 1
    first = made[0]
    assert first.peers == ("192.0.2.2", "192.0.2.3") and set(first.nics) == {web.id}
    assert made[1].peers == ("192.0.2.1", "192.0.2.3") and made[1].nics == {}
    assert all(plan.records == {"web-1": web.address} for plan in made)


def test_the_ruleset_guards_each_tap_and_follows_nat_and_publish() -> None:
    guest = Guarded("mvt1", "02:00:00:00:00:01", "10.9.0.5", (parse_publish("8080:80"),))
    plan = NetworkPlan(ClusterNetwork("default", "10.9.0.0/24"), "10.9.0.1/24", "192.0.2.1", ())
    rules = render_ruleset(plan, [guest])
    assert 'iifname "mvt1" ether saddr != 02:00:00:00:00:01 drop' in rules
    assert 'iifname "mvt1" ether type ip ip saddr != 10.9.0.5 drop' in rules
    assert 'iifname "mvt1" ether type arp arp saddr ip != 10.9.0.5 drop' in rules
    assert "masquerade" in rules
    assert "tcp dport 8080 dnat to 10.9.0.5:80" in rules
    no_nat = NetworkPlan(
        ClusterNetwork("default", "10.9.0.0/24", nat=False), "10.9.0.1/24", "192.0.2.1", ()
    )
    assert "masquerade" not in render_ruleset(no_nat, [guest])
    # Replaced whole each time: the table is created, deleted and made again in one go.
    assert rules.index("delete table bridge multiverse") < rules.index("chain guard")


class _RecordingNetwork:
    """A NodeNetwork that records the calls the agent makes, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.plans: list[NetworkPlan] = []

    async def ensure(self, plan: NetworkPlan) -> None:
        self.plans.append(plan)

    async def attach(self, vm_id: str, nic: Nic) -> NetworkAttachment:
        self.calls.append(("attach", vm_id))
        return NetworkAttachment(tap="mvt-test", nic=nic, mtu=1450)

    async def detach(self, vm_id: str) -> None:
        self.calls.append(("detach", vm_id))


class _SeeingDriver(FakeDriver):
    """The fake driver, remembering the network each start was given."""

    started_with: list[NetworkAttachment | None]

    async def start(self, vm: VMConfig) -> VMStatus:
        self.started_with.append(vm.network)
        return await super().start(vm)


def test_the_agent_attaches_before_each_boot_and_detaches_after_stop_and_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MULTIVERSE_ALLOW_FAKE", "1")
    nic = Nic(address="10.9.0.5/24", mac=mac_for("i-1"), gateway="10.9.0.1", dns="10.9.0.1")

    async def scenario() -> None:
        network = _RecordingNetwork()
        driver = _SeeingDriver(tmp_path / "fake")
        driver.started_with = []
        agent = Agent(driver, LocalStore(tmp_path / "agent.db"), network)
        record = await agent.launch("i-1", InstanceSpec(name="web-1"), nic)

        async def settled(state: InstanceState) -> None:
            while record.state != state:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(settled(InstanceState.RUNNING), 10)
        assert driver.started_with == [NetworkAttachment("mvt-test", nic, 1450)]
        await agent.stop("i-1")
        await asyncio.wait_for(settled(InstanceState.STOPPED), 10)
        await agent.start("i-1")
        await asyncio.wait_for(settled(InstanceState.RUNNING), 10)
        await agent.delete("i-1")
        await asyncio.wait_for(_gone(agent, "i-1"), 10)
        assert network.calls == [
            ("attach", "i-1"), ("detach", "i-1"), ("attach", "i-1"), ("detach", "i-1"),
        ]  # fmt: skip
        await agent.shutdown()

    asyncio.run(scenario())


def test_the_agent_detaches_a_vm_that_stopped_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest poweroff: the agent sees it stopped and unplugs its tap at once, not at the
    VM's next start or delete."""
    monkeypatch.setenv("MULTIVERSE_ALLOW_FAKE", "1")
    nic = Nic(address="10.9.0.5/24", mac=mac_for("i-1"), gateway="10.9.0.1", dns="10.9.0.1")

    async def scenario() -> None:
        network = _RecordingNetwork()
        driver = FakeDriver(tmp_path / "fake")
        agent = Agent(driver, LocalStore(tmp_path / "agent.db"), network)
        record = await agent.launch("i-1", InstanceSpec(name="web-1"), nic)

        async def running() -> None:
            while record.state != InstanceState.RUNNING:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(running(), 10)
        driver._vms["i-1"]["power"] = "stopped"  # the guest powered itself off
        await agent.observe()
        assert record.state == InstanceState.STOPPED
        assert network.calls == [("attach", "i-1"), ("detach", "i-1")]
        await agent.observe()  # settled: nothing more
        assert network.calls == [("attach", "i-1"), ("detach", "i-1")]
        await agent.shutdown()

    asyncio.run(scenario())


async def _gone(agent: Agent, vm_id: str) -> None:
    while vm_id in agent.records:
        await asyncio.sleep(0.01)


def test_the_worker_keeps_each_vm_interface_across_restarts(tmp_path: Path) -> None:
    nic = Nic("10.9.0.5/24", mac_for("i-1"), "10.9.0.1", "10.9.0.1", publish=(Publish(80, 8),))
    store = LocalStore(tmp_path / "agent.db")
    store.save(VMRecord(id="i-1", spec=InstanceSpec(name="web-1"), nic=nic))
    store.close()
    (loaded,) = LocalStore(tmp_path / "agent.db").load()
    assert loaded.nic == nic
