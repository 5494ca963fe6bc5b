"""`node add`'s parts that need no SSH server: parsing, refusals, the units, a master restart
in the middle of an install. The end-to-end runs are in test_node_add.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import asyncssh
import pytest
from harness import free_port

from multiverse.core.errors import InvalidArgument
from multiverse.core.model import Node, NodeStatus, Resources
from multiverse.master.events import EventBus
from multiverse.master.operations import Operations
from multiverse.master.provision import (
    Credentials,
    Installer,
    InstallRequest,
    SSHTarget,
    worker_unit,
)
from multiverse.master.server import Master, MasterConfig
from multiverse.master.wheelhouse import Wheelhouse
from multiverse.store.repository import Store

KEY = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("root@host", SSHTarget("root", "host", 22)),
        ("ops@10.0.0.5:2222", SSHTarget("ops", "10.0.0.5", 2222)),
        ("ops@[fd00::1]:22", SSHTarget("ops", "fd00::1", 22)),
    ],
)
def test_ssh_targets_parse(text: str, expected: SSHTarget) -> None:
    assert SSHTarget.parse(text) == expected
    assert SSHTarget.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["host", "@host", "root@", "root@host:0", "root@host:70000", "root@ho st", "a@b;rm"]
)
def test_bad_ssh_targets_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid --ssh"):
        SSHTarget.parse(text)


@pytest.mark.parametrize(
    ("credentials", "message"),
    [
        (Credentials(), "identity .* or password"),
        (Credentials(password="p", identity=KEY), "identity .* or password"),
        (Credentials(identity="not a key"), "not a private key"),
        (Credentials(password="p", host_key_fingerprint="MD5:aa"), "invalid host key"),
    ],
)
def test_bad_credentials_are_refused(credentials: Credentials, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        credentials.check()


def test_credentials_never_show_their_secrets() -> None:
    shown = repr(Credentials(password="hunter2-secret", identity=KEY, known_hosts="h k"))
    assert "hunter2-secret" not in shown and "PRIVATE KEY" not in shown


@pytest.fixture
def installer(tmp_path: Path) -> Iterator[Installer]:
    store = Store.for_data_dir(tmp_path)
    store.migrate()
    events = EventBus()

    async def no_token(host: str, ttl: timedelta, description: str) -> tuple[str, str]:
        raise AssertionError("no token may be issued for a refused request")

    yield Installer(
        store, events, Operations(events), Wheelhouse(tmp_path / "wheels"), no_token, lambda: 1
    )
    store.close()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (InstallRequest("n1", SSHTarget("root", "h"), driver="fake"), "fake driver is a test"),
        (InstallRequest("n1", SSHTarget("root", "h"), root="/"), "invalid install root"),
        (InstallRequest("n1", SSHTarget("root", "h"), root="/opt/../etc"), "invalid install"),
        (InstallRequest("n1", SSHTarget("root", "h"), driver="xen"), "unknown driver"),
        (InstallRequest("1bad", SSHTarget("root", "h")), "invalid node name"),
        (InstallRequest("n1", SSHTarget("root", "h"), labels={"a b": "c"}), "invalid label"),
    ],
)
def test_refused_installs_change_nothing(
    installer: Installer, request_: InstallRequest, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        asyncio.run(installer.add(request_, Credentials(identity=KEY)))
    assert asyncio.run(installer.store.list_nodes()) == []
    assert len(installer.operations) == 0


def test_a_node_that_joined_by_hand_is_not_taken_over(installer: Installer) -> None:
    node = Node(str(uuid.uuid4()), "n1", "", "qemu", NodeStatus.READY, {}, Resources())
    asyncio.run(installer.store.add_node(node, "1"))
    request = InstallRequest("n1", SSHTarget("root", "h"))
    with pytest.raises(Exception, match="exists already"):
        asyncio.run(installer.add(request, Credentials(identity=KEY)))
    assert asyncio.run(installer.store.find_node("n1")).status == NodeStatus.READY


def test_an_install_cut_by_a_master_restart_is_failed_not_installing(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = MasterConfig(
            data_dir=tmp_path, listen=f"127.0.0.1:{free_port()}",
            api_listen=f"127.0.0.1:{free_port()}",
        )  # fmt: skip
        master = Master(config)
        node = Node(
            str(uuid.uuid4()), "half", "", "qemu", NodeStatus.INSTALLING, {}, Resources(),
            message="venv: installing",
        )  # fmt: skip
        await master.store.add_node(node, "")
        await master.start()
        try:
            found = await master.store.find_node("half")
            assert found.status == NodeStatus.FAILED
            assert "venv: installing" in found.message and "node add" in found.message
        finally:
            await master.stop()

    asyncio.run(scenario())


def test_worker_unit_restarts_the_worker_and_leaves_vms_alone() -> None:
    unit = worker_unit("/opt/multiverse")
    assert "ExecStart=/opt/multiverse/worker.sh\n" in unit
    assert "Restart=always" in unit and "KillMode=process" in unit
    assert "WantedBy=multi-user.target" in unit


def test_master_install_service_writes_the_unit_with_its_options(tmp_path: Path) -> None:
    env = {**os.environ, "MULTIVERSE_SYSTEMD_DIR": str(tmp_path)}
    data = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-m", "multiverse", "master", "--data-dir", str(data),
         "--install-service", "--api-listen", "0.0.0.0:1338"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "multiverse-master.service").read_text()
    command = f"{sys.executable} -m multiverse master --data-dir {data} --api-listen 0.0.0.0:1338"
    assert f"ExecStart={command}\n" in unit
    assert "--install-service" not in unit
    assert not data.exists()  # only the unit: no master ran
    if not Path("/run/systemd/system").is_dir():
        assert "systemd does not run here" in done.stdout


def test_the_wheelhouse_is_built_once_per_source_and_keeps_only_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a stand-in for `pip wheel` (the real build is exercised by test_node_add.py)."""
    calls: list[list[str]] = []

    async def fake_exec(*args: str, **_: object) -> object:
        calls.append(list(args))
        Path(args[args.index("--wheel-dir") + 1], "multiverse-0.1.0-py3-none-any.whl").touch()

        class Done:
            returncode = 0

            async def communicate(self) -> tuple[bytes, bytes]:
                return b"", b""

        return Done()

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fake_exec)
    cache = tmp_path / "cache"
    (cache / "0.0.9-olderolderolder").mkdir(parents=True)
    wheelhouse = Wheelhouse(cache)
    built = asyncio.run(wheelhouse.ensure())
    assert asyncio.run(wheelhouse.ensure()) == built
    assert len(calls) == 1 and calls[0][1:4] == ["-m", "pip", "wheel"]
    assert [path.name for path in Wheelhouse.wheels(built)] == ["multiverse-0.1.0-py3-none-any.whl"]
    assert sorted(path.name for path in cache.iterdir()) == [built.name]
