"""The Multipass driver against the stand-in CLI (tests/standins/multipass).

The stand-in prints Multipass' documented JSON shapes, messages and exit codes; its fault
switches (``MULTIPASS_STANDIN_FAULT``) make it print what a broken or different Multipass might:
every such case must end in a typed error or a status with a reason, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import async_wait_until

from multiverse.core.errors import (
    AlreadyExists,
    Conflict,
    DriverError,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
)
from multiverse.core.model import InstanceSpec, InstanceState
from multiverse.core.sizes import GiB, MiB
from multiverse.drivers.base import ExecChunk, PowerState, TerminalSize, VMConfig
from multiverse.drivers.multipass import (
    BINARY_ENV,
    MultipassDriver,
    error_for,
    first_ipv4,
    parse_info_stats,
    parse_list,
)

STANDIN = Path(__file__).resolve().parent / "standins" / "multipass"
T = TypeVar("T")


def run(step: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await step()

    return asyncio.run(main())


def new_vm(name: str = "web-1", user_data: str = "") -> VMConfig:
    return VMConfig(
        id=str(uuid.uuid4()),
        name=name,
        cpus=2,
        memory=512 * MiB,
        disk=5 * GiB,
        image="tiny",
        user_data=user_data,
    )


@pytest.fixture()
def standin_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "multipassd" / "state.json"
    monkeypatch.setenv("MULTIPASS_STANDIN_STATE", str(path))
    monkeypatch.delenv("MULTIPASS_STANDIN_FAULT", raising=False)
    return path


@pytest.fixture()
def driver(tmp_path: Path, standin_state: Path) -> MultipassDriver:
    # list_ttl=0: every status() asks the CLI, so a fault switched on is seen at once.
    return MultipassDriver(tmp_path / "driver", binary=str(STANDIN), list_ttl=0)


def standin_instances(state: Path) -> dict[str, Any]:
    instances: dict[str, Any] = json.loads(state.read_text())["instances"]
    return instances


async def collect(
    driver: MultipassDriver, vm: VMConfig, command: list[str], stdin: bytes = b""
) -> tuple[int, bytes, bytes, list[ExecChunk]]:
    chunks = [chunk async for chunk in driver.exec(vm, command, stdin)]
    out = b"".join(chunk.data for chunk in chunks if chunk.stream == 1)
    err = b"".join(chunk.data for chunk in chunks if chunk.stream == 2)
    exit_code = chunks[-1].exit_code
    assert exit_code is not None
    return exit_code, out, err, chunks


# --- lifecycle -------------------------------------------------------------------------------


def test_lifecycle(driver: MultipassDriver, standin_state: Path) -> None:
    vm = new_vm(user_data="#cloud-config\npackages: [htop]\n")

    async def scenario() -> None:
        assert (await driver.status(vm)).power == PowerState.MISSING
        await driver.create(vm)
        await driver.create(vm)  # idempotent
        created = await driver.status(vm)
        assert created.power == PowerState.STOPPED and "launched on first start" in created.message
        assert not standin_state.exists() or vm.name not in standin_instances(standin_state)

        status = await driver.start(vm)
        assert status.power == PowerState.RUNNING and status.ipv4.startswith("10.")
        record = standin_instances(standin_state)[vm.name]
        # The launch carried the spec: cpus, memory, disk, cloud-init, the mapped image.
        assert (record["cpus"], record["memory"], record["disk"]) == (2, 512 * MiB, 5 * GiB)
        assert record["cloud_init"] == vm.user_data and record["image"] == "lts"
        # On stdin, never in a file: the snap cannot read files outside a non-hidden home.
        assert record["cloud_init_from"] == "stdin"
        assert list((driver.state_dir / "created").iterdir()) == []
        assert (await driver.start(vm)).power == PowerState.RUNNING  # idempotent

        stats = await driver.stats(vm)
        assert stats.memory_total == 512 * MiB and 0 < stats.memory_used < stats.memory_total
        assert stats.disk_total == 5 * GiB and 0 < stats.disk_used < stats.disk_total
        assert stats.release == "Ubuntu 24.04.1 LTS" and stats.ipv4 == status.ipv4
        assert 0 <= stats.load[0] <= 1

        await driver.stop(vm)
        assert standin_instances(standin_state)[vm.name]["state"] == "Stopped"
        stopped = await driver.status(vm)
        assert stopped.power == PowerState.STOPPED and stopped.ipv4 == ""
        await driver.stop(vm)  # idempotent
        with pytest.raises(Conflict):
            await driver.stats(vm)

        assert (await driver.start(vm)).power == PowerState.RUNNING
        assert (await driver.restart(vm)).power == PowerState.RUNNING
        await driver.stop(vm, force=True)
        assert (await driver.status(vm)).power == PowerState.STOPPED

        await driver.delete(vm)
        await driver.delete(vm)  # idempotent
        assert (await driver.status(vm)).power == PowerState.MISSING
        assert standin_instances(standin_state) == {}
        with pytest.raises(NotFound):
            await driver.start(vm)
        with pytest.raises(NotFound):
            await driver.stop(vm)

    run(scenario)


def test_validate_refuses_what_multipass_refuses(driver: MultipassDriver) -> None:
    small = VMConfig(
        id=str(uuid.uuid4()), name="x", cpus=1, memory=64 * MiB, disk=GiB, image="tiny"
    )
    with pytest.raises(InvalidArgument, match=r"at least 128\.0MiB"):
        run(lambda: driver.validate(small))
    tiny_disk = VMConfig(id=str(uuid.uuid4()), name="x", cpus=1, memory=GiB, disk=MiB, image="x")
    with pytest.raises(InvalidArgument, match="disk"):
        run(lambda: driver.create(tiny_disk))
    assert list((driver.state_dir / "created").iterdir()) == []


def test_unknown_image_fails_the_start_and_keeps_the_creation(driver: MultipassDriver) -> None:
    vm = VMConfig(id=str(uuid.uuid4()), name="odd", cpus=1, memory=GiB, disk=5 * GiB, image="plan9")

    async def scenario() -> None:
        await driver.create(vm)
        with pytest.raises(DriverError, match='Unable to find an image matching "plan9"'):
            await driver.start(vm)
        # Still created, so a retry (or a delete) finds it.
        assert (await driver.status(vm)).power == PowerState.STOPPED
        await driver.delete(vm)
        assert (await driver.status(vm)).power == PowerState.MISSING

    run(scenario)


def test_name_taken_outside_multiverse_is_adopted_not_relaunched(
    driver: MultipassDriver, standin_state: Path
) -> None:
    """An instance that already exists by that name (a restarted agent's) is started, not
    launched again."""
    vm = new_vm("adopted")

    async def scenario() -> None:
        await driver.create(vm)
        await driver.start(vm)
        await driver.stop(vm)
        fresh = MultipassDriver(driver.state_dir, binary=str(STANDIN), list_ttl=0)
        assert (await fresh.status(vm)).power == PowerState.STOPPED
        assert (await fresh.start(vm)).power == PowerState.RUNNING
        await fresh.delete(vm)

    run(scenario)


# --- exec and sessions -----------------------------------------------------------------------


def test_exec_splits_streams_and_passes_the_exit_code(driver: MultipassDriver) -> None:
    vm = new_vm()

    async def scenario() -> None:
        await driver.create(vm)
        await driver.start(vm)
        code, out, err, chunks = await collect(
            driver, vm, ["sh", "-c", "echo out; echo err >&2; cat; exit 7"], b"from stdin\n"
        )
        assert code == 7
        assert out == b"out\nfrom stdin\n" and err == b"err\n"
        assert all(chunk.exit_code is None for chunk in chunks[:-1])
        code, out, _err, _ = await collect(
            driver, vm, ["sh", "-c", "printf '%s|' \"$@\"", "-", "a b", "*"]
        )
        assert code == 0 and out == b"a b|*|"  # arguments arrive as given, no shell splitting
        code, _out, err, _ = await collect(driver, vm, ["no-such-program-here"])
        assert code == 127 and b"no-such-program-here" in err
        with pytest.raises(InvalidArgument):
            await collect(driver, vm, [])
        await driver.stop(vm)
        with pytest.raises(Conflict, match="is stopped; start it first"):
            await collect(driver, vm, ["true"])
        await driver.delete(vm)
        with pytest.raises(NotFound):
            await collect(driver, vm, ["true"])

    run(scenario)


async def read_until(session: Any, marker: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {seen!r}"
        data = await asyncio.wait_for(session.read(), remaining)
        if not data:
            break
        seen += data
    return seen


def test_shell_session_on_a_local_pty_with_resize(driver: MultipassDriver) -> None:
    vm = new_vm()

    async def scenario() -> None:
        await driver.create(vm)
        await driver.start(vm)
        session = await driver.open_session(vm, None, TerminalSize(cols=100, rows=30))
        try:
            await session.write(b"stty size; echo MARK$((0+1))\n")
            assert b"30 100" in await read_until(session, b"MARK1\r\n")
            await session.resize(132, 43)
            await session.write(b"stty size; echo MARK$((0+2))\n")
            assert b"43 132" in await read_until(session, b"MARK2\r\n")
            await session.write(b"exit 5\n")
            await read_until(session, b"\x00never")  # reads to the end
            assert await asyncio.wait_for(session.wait(), 10) == 5
        finally:
            await session.close()

        command = await driver.open_session(vm, ["sh", "-c", "tty; exit 3"], TerminalSize())
        try:
            assert b"/dev/pts/" in await read_until(command, b"\n")
            assert await asyncio.wait_for(command.wait(), 10) == 3
        finally:
            await command.close()

        piped = await driver.open_session(vm, ["sh", "-c", "cat; exit 4"], None)
        try:
            await piped.write(b"no terminal\n")
            await piped.close_input()
            assert await read_until(piped, b"\x00never") == b"no terminal\n"
            assert await asyncio.wait_for(piped.wait(), 10) == 4
        finally:
            await piped.close()

        # close_input on a terminal is Ctrl-D: the shell ends as at the end of a file.
        ending = await driver.open_session(vm, None, None)
        await ending.close_input()
        assert await asyncio.wait_for(ending.wait(), 10) == 0
        await ending.close()

        await driver.stop(vm)
        with pytest.raises(Conflict, match="is stopped; start it first"):
            await driver.open_session(vm, None, None)
        # Refused before the client ran: Multipass' own client would have started it.
        assert (await driver.status(vm)).power == PowerState.STOPPED

    run(scenario)


# --- malformed output and failures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "words"),
    [
        ("truncated-json", DriverError, "malformed JSON"),
        ("unknown-state", DriverError, "as Unknown"),
        ("strange-state", DriverError, "'Levitating'"),
        ("missing-fields", DriverError, "without a state"),
        ("daemon-down", Unavailable, "cannot connect to the multipass socket"),
        ("socket-denied", Unavailable, "multipass socket access denied"),
        ("unauthenticated", Unavailable, "The client is not authenticated"),
    ],
)
def test_malformed_output_gives_a_typed_error(
    driver: MultipassDriver,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    error: type[MultiverseError],
    words: str,
) -> None:
    vm = new_vm()

    async def scenario() -> None:
        await driver.create(vm)
        await driver.start(vm)
        monkeypatch.setenv("MULTIPASS_STANDIN_FAULT", fault)
        with pytest.raises(error, match=words):
            await driver.status(vm)
        # Every other call fails typed too (or, with partial info, still answers).
        for call in (
            lambda: driver.stats(vm),
            lambda: driver.stop(vm),
            lambda: collect(driver, vm, ["true"]),
        ):
            with contextlib.suppress(MultiverseError):
                await call()
        monkeypatch.delenv("MULTIPASS_STANDIN_FAULT")
        assert (await driver.status(vm)).power in (PowerState.RUNNING, PowerState.STOPPED)

    run(scenario)


def test_launch_failure_and_missing_binary(
    driver: MultipassDriver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vm = new_vm()
    monkeypatch.setenv("MULTIPASS_STANDIN_FAULT", "launch-fails")

    async def scenario() -> None:
        await driver.create(vm)
        with pytest.raises(DriverError, match="hash does not match"):
            await driver.start(vm)
        assert (await driver.status(vm)).power == PowerState.STOPPED

        missing = MultipassDriver(tmp_path / "other", binary=str(tmp_path / "no-multipass"))
        with pytest.raises(Unavailable, match=BINARY_ENV):
            await missing.status(vm)

    run(scenario)


def test_binary_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BINARY_ENV, str(STANDIN))
    assert MultipassDriver(tmp_path).binary == str(STANDIN)
    assert MultipassDriver(tmp_path, binary="/opt/mp").binary == "/opt/mp"


def test_command_line_error_and_name_clash(driver: MultipassDriver) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidArgument, match="Unknown option '--bogus'"):
            await driver._run_checked("list", "--bogus")
        await driver._run_checked("launch", "--name", "taken", "lts")
        with pytest.raises(AlreadyExists, match='"taken" already exists'):
            await driver._run_checked("launch", "--name", "taken", "lts")
        with pytest.raises(NotFound, match='instance "ghost" does not exist'):
            await driver._run_checked("info", "ghost", "--format", "json")

    run(scenario)


def standin(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The stand-in CLI run directly, as a user would run ``multipass``."""
    return subprocess.run(
        [str(STANDIN), *argv], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_daemon_refusals_are_exit_2_and_bad_arguments_are_typed(driver: MultipassDriver) -> None:
    """Name, memory and disk are judged by the daemon: exit 2, "Invalid arguments supplied"."""
    for argv, words in (
        (["--name", "bad_name"], "Invalid instance name supplied: bad_name"),
        (["--name", "ok", "--memory", "64M"], "Invalid memory size value supplied: 64M."),
        (["--name", "ok", "--disk", "100M"], "Invalid disk size value supplied: 100M."),
    ):
        answer = standin("launch", *argv, "lts")
        assert answer.returncode == 2
        assert answer.stderr.startswith("launch failed: Invalid arguments supplied\n" + words)
        with pytest.raises(InvalidArgument, match=words):
            run(lambda argv=argv: driver._run_checked("launch", *argv, "lts"))  # type: ignore[misc]


def test_unreachable_daemon_is_exit_2(standin_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for fault in ("daemon-down", "socket-denied", "unauthenticated"):
        monkeypatch.setenv("MULTIPASS_STANDIN_FAULT", fault)
        answer = standin("list", "--format", "json")
        assert answer.returncode == 2 and answer.stderr.startswith("list failed: ")


def test_user_data_must_be_a_cloud_config_mapping(
    driver: MultipassDriver, standin_state: Path
) -> None:
    for user_data in ("#!/bin/sh\necho hi\n", "- a\n- b\n", "just text\n", "a: [\n"):
        vm = new_vm("scripted", user_data=user_data)
        with pytest.raises(InvalidArgument, match="cloud-config YAML"):
            run(lambda vm=vm: driver.create(vm))  # type: ignore[misc]
    assert list((driver.state_dir / "created").iterdir()) == []
    # Multipass' client refuses it too, from stdin, before asking the daemon.
    answer = standin("launch", "--name", "x", "--cloud-init", "-", "lts", stdin="- a\n")
    assert answer.returncode == 1 and "error loading cloud-init config" in answer.stderr
    assert not standin_state.exists() or standin_instances(standin_state) == {}


def test_launch_and_start_pass_a_timeout_multipass_answers_first(
    driver: MultipassDriver, standin_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--timeout`` reaches the client, whose own "Timed out" (exit 5) comes before our limit."""
    vm = new_vm("slow")
    driver.launch_timeout = driver.start_timeout = 1

    async def scenario() -> None:
        await driver.create(vm)
        monkeypatch.setenv("MULTIPASS_STANDIN_DELAY", "3")
        with pytest.raises(Unavailable, match="Timed out waiting for instance launch"):
            await driver.start(vm)
        # Like Multipass, the launch goes on after the client gave up: the VM is Starting.
        assert standin_instances(standin_state)[vm.name]["state"] == "Starting"
        monkeypatch.delenv("MULTIPASS_STANDIN_DELAY")
        assert (await driver.start(vm)).power == PowerState.RUNNING
        await driver.stop(vm)
        monkeypatch.setenv("MULTIPASS_STANDIN_DELAY", "3")
        with pytest.raises(Unavailable, match="Timed out waiting for instance to start"):
            await driver.start(vm)
        monkeypatch.delenv("MULTIPASS_STANDIN_DELAY")
        await driver.delete(vm)

    run(scenario)


def test_starting_is_running_but_not_yet_usable(
    driver: MultipassDriver, standin_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = new_vm("booting")

    async def scenario() -> None:
        await driver.create(vm)
        monkeypatch.setenv("MULTIPASS_STANDIN_DELAY", "3")
        launch = asyncio.create_task(driver.start(vm))
        try:
            await async_wait_until(
                lambda: (
                    standin_state.exists()
                    and standin_instances(standin_state).get(vm.name, {}).get("state") == "Starting"
                )
            )
            status = await driver.status(vm)
            assert status.power == PowerState.RUNNING and "Starting" in status.message
            with pytest.raises(Conflict, match=r"not running \(Multipass: Starting\)"):
                await collect(driver, vm, ["true"])
            assert (await launch).power == PowerState.RUNNING
        finally:
            launch.cancel()
            monkeypatch.delenv("MULTIPASS_STANDIN_DELAY")
            await driver.delete(vm)

    run(scenario)


def test_no_address_yet_is_no_address(
    driver: MultipassDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = new_vm()

    async def scenario() -> None:
        await driver.create(vm)
        assert (await driver.start(vm)).ipv4
        monkeypatch.setenv("MULTIPASS_STANDIN_FAULT", "no-address")
        status = await driver.status(vm)
        assert status.power == PowerState.RUNNING and status.ipv4 == ""
        assert (await driver.stats(vm)).ipv4 == ""

    run(scenario)


def test_standin_exec_on_a_stopped_instance_starts_it_as_multipass_does(
    driver: MultipassDriver, standin_state: Path
) -> None:
    """The stand-in follows the real client here; the driver refuses before (tested above)."""
    vm = new_vm()
    run(lambda: driver.create(vm))
    run(lambda: driver.start(vm))
    run(lambda: driver.stop(vm))
    answer = standin("exec", vm.name, "--", "sh", "-c", "echo inside")
    assert (answer.returncode, answer.stdout) == (0, "inside\n")
    assert standin_instances(standin_state)[vm.name]["state"] == "Running"


def test_deleted_but_not_purged_is_missing_with_a_reason(driver: MultipassDriver) -> None:
    vm = new_vm()

    async def scenario() -> None:
        await driver.create(vm)
        await driver.start(vm)
        await driver._run_checked("delete", vm.name)  # someone deleted it without --purge
        status = await driver.status(vm)
        assert status.power == PowerState.MISSING and "multipass recover" in status.message
        await driver.delete(vm)
        assert (await driver.status(vm)).power == PowerState.MISSING

    run(scenario)


# --- the parsers alone -----------------------------------------------------------------------


def test_error_for_maps_every_exit_code() -> None:
    assert isinstance(error_for("info", 1, "error: bad"), InvalidArgument)
    assert isinstance(error_for("info", 2, 'instance "x" does not exist'), NotFound)
    assert isinstance(error_for("launch", 2, 'instance "x" already exists'), AlreadyExists)
    assert isinstance(error_for("exec", 2, 'instance "x" is not running'), Conflict)
    assert isinstance(error_for("start", 2, "boom"), DriverError)
    # A daemon that is down or refuses us is exit 2, told apart only by its text.
    for reason in (
        "list failed: cannot connect to the multipass socket",
        "list failed: multipass socket access denied\nPlease check ...",
        "list failed: The client is not authenticated with the Multipass service.",
    ):
        assert isinstance(error_for("list", 2, reason), Unavailable), reason
    invalid = "launch failed: Invalid arguments supplied\nInvalid memory size value supplied: 1M."
    assert isinstance(error_for("launch", 2, invalid), InvalidArgument)
    assert isinstance(error_for("launch", 5, "Timed out waiting for instance launch."), Unavailable)
    assert type(error_for("list", 3, "")) is DriverError  # no Multipass exits 3
    other = error_for("list", -9, "")
    assert (
        type(other) is DriverError
        and "code -9" in other.message
        and "(no message)" in other.message
    )


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", "null", '{"list": {}}', '{"list": "x"}', '{"lis', "\x00\xff"],
)
def test_parse_list_never_crashes(text: str) -> None:
    with pytest.raises(DriverError):
        parse_list(text)


def test_parse_list_skips_nameless_entries_and_keeps_partial_ones() -> None:
    entries = parse_list('{"list": [{"state": "Running"}, 7, {"name": "a"}, {"name": 3}]}')
    assert entries == {"a": {"name": "a"}}


def test_parse_info_stats_mixed_and_missing_fields() -> None:
    stats = parse_info_stats(
        {
            "cpu_count": "1",
            "disks": {"sda1": {"total": "5116440064", "used": "1656365056"}, "sdb": {}},
            "load": [0.5, "0.25", 0.125],
            "memory": {"total": 1020702720, "used": 157110272},
            "ipv4": ["10.1.2.3", "172.17.0.1"],
            "release": "Ubuntu 22.04.1 LTS",
            "state": "Running",
        }
    )
    assert stats.load == (0.5, 0.25, 0.125)
    assert (stats.disk_total, stats.disk_used) == (5116440064, 1656365056)
    assert (stats.memory_total, stats.memory_used) == (1020702720, 157110272)
    assert stats.ipv4 == "10.1.2.3" and stats.release == "Ubuntu 22.04.1 LTS"
    empty = parse_info_stats({"load": ["x"], "memory": "?", "disks": [], "release": 5, "ipv4": 1})
    assert empty.load == (0.0, 0.0, 0.0) and empty.memory_total == 0 and empty.release == ""
    assert parse_info_stats({"image_release": "22.04 LTS"}).release == "22.04 LTS"


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (["N/A"], ""),
        ("N/A", ""),
        (["--", "UNKNOWN", "10.1.2.3"], "10.1.2.3"),
        ([], ""),
        (["fe80::1", "192.168.64.2"], "192.168.64.2"),
        (" 10.0.0.9 ", "10.0.0.9"),
    ],
)
def test_first_ipv4_takes_only_addresses(value: Any, address: str) -> None:
    assert first_ipv4(value) == address


# --- through the worker agent ---------------------------------------------------------------


def state_of(record: Any) -> InstanceState:
    """The record's state now (a call, so the type checker does not keep an earlier narrowing)."""
    state: InstanceState = record.state
    return state


def test_agent_shows_unknown_with_the_reason_and_keeps_going(
    driver: MultipassDriver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from multiverse.worker.agent import Agent
    from multiverse.worker.localstore import LocalStore

    async def scenario() -> None:
        agent = Agent(driver, LocalStore(tmp_path / "agent.db"))
        instance_id = str(uuid.uuid4())
        spec = InstanceSpec(name="watched", memory=512 * MiB, disk=5 * GiB)
        record = await agent.launch(instance_id, spec)
        await async_wait_until(
            lambda: record.state in (InstanceState.RUNNING, InstanceState.FAILED), 10
        )
        assert record.state == InstanceState.RUNNING, record.message
        # Running is told before the boot's last step (reading the guest's release) ends, and
        # observe() leaves an instance alone while an action holds it: wait for the boot to end.
        await async_wait_until(lambda: not agent._tasks, 10)
        for fault, words in (
            ("truncated-json", "malformed JSON"),
            ("unknown-state", "Unknown"),
            ("missing-fields", "without a state"),
            ("daemon-down", "daemon is unreachable"),
            ("unauthenticated", "daemon is unreachable"),
        ):
            monkeypatch.setenv("MULTIPASS_STANDIN_FAULT", fault)
            await agent.observe()
            assert state_of(record) == InstanceState.UNKNOWN and words in record.message
        monkeypatch.delenv("MULTIPASS_STANDIN_FAULT")
        await agent.observe()
        assert state_of(record) == InstanceState.RUNNING and record.ipv4
        await agent.shutdown()

    run(scenario)
