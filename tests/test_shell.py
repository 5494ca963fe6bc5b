"""The interactive shell through the whole path (CLI -> WebSocket -> master -> gRPC -> agent ->
a PTY), on a real terminal (pexpect), with the fake driver: its shell is a local /bin/sh."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pexpect
import pytest
import websockets
from harness import Cluster, new_cluster


@pytest.fixture(scope="module")
def shells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with new_cluster(tmp_path_factory.mktemp("shell")) as cluster:
        cluster.start_master()
        cluster.start_worker("node-a")
        cluster.start_worker("node-b")
        cluster.ok("launch", "--name", "primary", "--node", "node-a")
        cluster.ok("launch", "--name", "other", "--node", "node-b")
        cluster.ok("launch", "--name", "resting", "--node", "node-b")
        cluster.ok("stop", "resting")
        yield cluster


def spawn_shell(cluster: Cluster, *args: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "multiverse", "shell", *args],
        env=cluster.env,
        dimensions=(rows, cols),
        timeout=30,
    )


def test_terminal_size_follows_and_exit_code_comes_back(shells: Cluster) -> None:
    child = spawn_shell(shells, rows=33, cols=101)  # "primary" is the default, as in Multipass
    child.sendline("stty size")
    child.expect(r"33 101\r\n")
    child.setwinsize(43, 132)  # TIOCSWINSZ on the CLI's terminal: it gets SIGWINCH
    child.sendline("stty size")
    child.expect(r"43 132\r\n")
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3


def test_control_keys_reach_the_guest(shells: Cluster) -> None:
    child = spawn_shell(shells, "other")
    child.expect(r"other\$ ")  # the session is up: the CLI's terminal is raw from here on
    child.sendline("sleep 30; echo not-interrupted")
    child.expect(r"sleep 30.*\r\n")
    child.sendcontrol("c")  # raw mode: Ctrl-C is a byte for the guest's terminal, not for us
    child.expect(r"other\$ ")
    child.sendline("echo still-$((40 + 2))")
    child.expect("still-42\r\n")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert "not-interrupted" not in (child.before or b"").decode()
    assert child.exitstatus == 0


def test_piped_stdin_and_large_output_arrive_intact(shells: Cluster) -> None:
    shells.ok("exec", "primary", "--", "sh", "-c", "head -c 20000000 /dev/urandom > blob")
    expected = shells.ok("exec", "primary", "--", "sh", "-c", "base64 blob | sha256sum").out
    result = shells.cli("shell", "primary", stdin=b"base64 blob\n")
    assert result.code == 0, result.err
    assert len(result.out) > 26_000_000
    assert hashlib.sha256(result.out.encode()).hexdigest() == expected.split()[0]


def test_five_shells_at_once_keep_their_output_apart(shells: Cluster) -> None:
    def run(i: int) -> tuple[int, str]:
        name = ("primary", "other")[i % 2]
        script = f"for n in 1 2 3 4 5 6 7 8; do echo shell-{i}-$n; sleep 0.05; done; exit {i}\n"
        result = shells.cli("shell", name, stdin=script.encode())
        return result.code, result.out

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(run, range(5)))
    for i, (code, out) in enumerate(results):
        assert code == i
        assert out.split() == [f"shell-{i}-{n}" for n in range(1, 9)]


def test_shell_refusals_are_clear(shells: Cluster) -> None:
    stopped = shells.cli("shell", "resting")
    assert stopped.code == 2 and "not Running" in stopped.err
    unknown = shells.cli("shell", "ghost")
    assert unknown.code == 2 and "does not exist" in unknown.err

    async def handshake(headers: dict[str, str]) -> int:
        url = f"{shells.ws}/api/v1/instances/primary/shell"
        try:
            async with websockets.connect(url, additional_headers=headers, ssl=shells.ssl_context):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(handshake({})) == 401
    assert asyncio.run(handshake({"Authorization": "Bearer mva.x.y"})) == 401
    viewer = shells.ok("token", "create", "--api", "--role", "viewer").out.strip()
    assert asyncio.run(handshake({"Authorization": f"Bearer {viewer}"})) == 403


def test_a_flood_of_output_reaches_a_real_terminal(shells: Cluster) -> None:
    """On a terminal stdout shares its file with the non-blocking stdin: writes must wait."""
    child = spawn_shell(shells, "primary")
    child.sendline("seq 1 300000; echo flood-$((6 * 7))")  # ~2 MB at the terminal
    child.expect("flood-42", timeout=120)
    child.sendline("exit 0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
