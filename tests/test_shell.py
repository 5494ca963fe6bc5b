"""The interactive shell through the whole path (CLI -> WebSocket -> master -> gRPC -> agent ->
a PTY), on a real terminal (pexpect), with the fake driver: its shell is a local /bin/sh."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pexpect
import psutil
import pytest
import websockets
from harness import Cluster, async_wait_until, new_cluster, wait_until

from multiverse.core.errors import Unauthenticated
from multiverse.core.sessions import MAX_FRAME
from multiverse.worker.sessions import STREAMING, SessionTickets, output_frames


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
        env={**cluster.env, **DEBUG},
        dimensions=(rows, cols),
        timeout=30,
    )


def test_terminal_size_follows_and_exit_code_comes_back(shells: Cluster) -> None:
    before = direct_sessions(shells, "node-a")
    child = spawn_shell(shells, rows=33, cols=101)  # "primary" is the default, as in Multipass
    child.expect(STRAIGHT)  # said before the terminal goes raw: the session is on the node
    child.sendline("stty size")
    child.expect(r"33 101\r\n")
    child.setwinsize(43, 132)  # TIOCSWINSZ on the CLI's terminal: it gets SIGWINCH
    child.sendline("stty size")
    child.expect(r"43 132\r\n")
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    assert direct_sessions(shells, "node-a") == before + 1


def test_control_keys_reach_the_guest(shells: Cluster) -> None:
    child = spawn_shell(shells, "other")
    child.expect(r"other\$ ")  # the session is up: the CLI's terminal is raw from here on
    marker = f"sleep {30 + os.getpid() % 1000}.5"
    child.sendline(f"{marker}; echo not-interrupted")
    # Ctrl-C once sleep runs: sooner, it reaches the shell still forking it, which ignores it.
    wait_until(lambda: running(marker))
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


# ---- sessions straight to the node's agent (worker/sessions.py) ----

DEBUG = {"MULTIVERSE_DEBUG": "1"}
STRAIGHT = "session straight to the node"
RELAYED = "relaying through the master"


def direct_sessions(cluster: Cluster, node: str) -> int:
    """How many sessions the node's agent served straight to a client (its log says each)."""
    return cluster.workers[node].output().count("direct from")


def offer(cluster: Cluster, name: str, **body: object) -> httpx.Response:
    return cluster.http.post(
        f"{cluster.api}/api/v1/instances/{name}/sessions",
        json=body,
        headers={"Authorization": f"Bearer {cluster.token}"},
    )


def connect(
    given: dict[str, Any], ticket: str | None = None, url: str | None = None
) -> websockets.asyncio.client.connect:
    """The offered session's WebSocket, as the CLI opens it (``ticket``/``url`` override)."""
    secret = given["ticket"] if ticket is None else ticket
    return websockets.connect(
        url or given["url"],
        ssl=ssl.create_default_context(cadata=given["ca_certificate"]),
        server_hostname=given["server_name"],
        additional_headers={"Authorization": f"Bearer {secret}"} if secret else {},
        compression=None,
    )


async def redeem(
    given: dict[str, Any], ticket: str | None = None, url: str | None = None
) -> tuple[int, str]:
    """Open the offered session, give it nothing and read it to its end: (101, its last
    control frame) or (the HTTP refusal, its body)."""
    try:
        async with connect(given, ticket, url) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):  # it may have ended already
                await ws.send('{"type": "eof"}')
            last = ""
            async for message in ws:
                if isinstance(message, str):
                    last = message
            return 101, last
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, (exc.response.body or b"").decode()


def running(marker: str) -> list[psutil.Process]:
    """This host's processes whose command line holds ``marker`` (the fake driver's guest
    processes are local ones)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_piped_shell_goes_straight_to_the_node(shells: Cluster) -> None:
    before = direct_sessions(shells, "node-a")
    piped = shells.cli("shell", "primary", stdin=b"echo piped-$((2 * 21))\nexit 4\n", env=DEBUG)
    assert piped.code == 4 and piped.out.strip() == "piped-42"
    assert STRAIGHT in piped.err and RELAYED not in piped.err
    assert direct_sessions(shells, "node-a") == before + 1


def test_a_ticket_is_single_use_and_for_its_instance_only(shells: Cluster) -> None:
    given = offer(shells, "primary", command=["sh", "-c", "exit 5"], tty=False)
    assert given.status_code == 201, given.text
    ticket = given.json()
    assert ticket["url"].startswith("wss://") and len(ticket["ticket"]) >= 32
    assert asyncio.run(redeem(ticket)) == (101, '{"type": "exit", "code": 5}')

    status, body = asyncio.run(redeem(ticket))  # spent
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthenticated"

    # A ticket for "primary" shown at the path of "other" (same node, so the endpoint is the
    # same) is refused, and spent: it does not work at its own path afterwards either.
    shells.ok("launch", "--name", "neighbour", "--node", "node-a")
    neighbour_id = shells.instances()["neighbour"]["id"]
    fresh = offer(shells, "primary", command=["true"], tty=False).json()
    elsewhere = fresh["url"].rsplit("/", 1)[0] + "/" + neighbour_id
    status, body = asyncio.run(redeem(fresh, url=elsewhere))
    assert status == 401 and "another instance" in json.loads(body)["error"]["message"]
    assert asyncio.run(redeem(fresh))[0] == 401


def test_missing_or_bad_tickets_get_a_clean_refusal(shells: Cluster) -> None:
    given = offer(shells, "primary", command=["true"], tty=False).json()
    for ticket in ("", "not-a-ticket", given["ticket"][:-2] + "xx"):
        status, body = asyncio.run(redeem(given, ticket=ticket))
        assert status == 401, ticket
        assert json.loads(body)["error"]["code"] == "unauthenticated"
    status, body = asyncio.run(redeem(given, url=given["url"].replace("/v1/sessions/", "/v2/")))
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_argument"
    assert asyncio.run(redeem(given))[0] == 101  # the bad tries did not spend the real one


def test_session_offers_are_refused_as_the_shell_is(shells: Cluster) -> None:
    assert offer(shells, "resting").status_code == 409
    assert offer(shells, "ghost").status_code == 404
    assert offer(shells, "primary", cols=0, rows=24).status_code == 400
    assert offer(shells, "primary", command=["a\0b"]).status_code == 400
    viewer = shells.ok("token", "create", "--api", "--role", "viewer").out.strip()
    refused = shells.http.post(
        f"{shells.api}/api/v1/instances/primary/sessions",
        json={},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert refused.status_code == 403
    assert (
        shells.http.post(f"{shells.api}/api/v1/instances/primary/sessions", json={}).status_code
        == 401
    )


def test_closing_the_websocket_ends_the_process_in_the_guest(shells: Cluster) -> None:
    marker = f"sleep {1000 + os.getpid() % 1000}.25"
    given = offer(shells, "primary", command=["sh", "-c", marker], tty=False).json()

    async def open_and_drop() -> None:
        async with connect(given):
            await async_wait_until(lambda: running(marker))

    asyncio.run(open_and_drop())
    wait_until(lambda: not running(marker))


def test_agent_shutdown_closes_its_sessions(shells: Cluster) -> None:
    worker = shells.start_worker("node-brief")
    shells.ok("launch", "--name", "brief", "--node", "node-brief")
    marker = f"sleep {1000 + os.getpid() % 1000}.75"
    given = offer(shells, "brief", command=["sh", "-c", marker], tty=False).json()

    async def open_and_stop() -> int | None:
        async with connect(given) as ws:
            await async_wait_until(lambda: running(marker))
            assert worker.process is not None
            worker.process.terminate()  # the worker alone, not its process group
            async for _ in ws:  # ends when the agent closes the connection
                pass
            return ws.close_code

    try:
        assert asyncio.run(open_and_stop()) == 1001  # "going away"
        assert worker.process is not None and worker.process.wait(timeout=30) == 0
        wait_until(lambda: not running(marker))
    finally:
        worker.kill()


def test_an_unreachable_node_falls_back_to_the_relay(shells: Cluster) -> None:
    """The master dials this node at 127.0.0.3; its session endpoint listens on 127.0.0.1 only,
    so the CLI, sent to 127.0.0.3, is refused there and goes through the master."""
    shells.start_worker(
        "node-far", "--session-listen", "127.0.0.1:0", host="127.0.0.3", advertise=True
    )
    shells.ok("launch", "--name", "far", "--node", "node-far")
    assert offer(shells, "far", tty=False).json()["url"].startswith("wss://127.0.0.3:")
    result = shells.cli("shell", "far", stdin=b"echo far-$((6 * 7))\nexit 3\n", env=DEBUG)
    assert result.code == 3 and result.out.strip() == "far-42"
    assert RELAYED in result.err and STRAIGHT not in result.err
    assert direct_sessions(shells, "node-far") == 0


def test_a_ticket_expires_and_is_spent_by_its_first_showing() -> None:
    now = [100.0]
    tickets = SessionTickets(ttl=30.0, clock=lambda: now[0])
    late = tickets.issue("vm-1", ("sh",), None)
    now[0] += 30.0
    with pytest.raises(Unauthenticated, match="expired"):
        tickets.redeem(late, "vm-1")
    kept = tickets.issue("vm-1", (), None)
    assert len(kept) >= 43  # 256 random bits, base64
    now[0] += 29.9
    assert tickets.redeem(kept, "vm-1").command == ()
    with pytest.raises(Unauthenticated):
        tickets.redeem(kept, "vm-1")
    wrong = tickets.issue("vm-1", (), None)
    with pytest.raises(Unauthenticated, match="another instance"):
        tickets.redeem(wrong, "vm-2")
    with pytest.raises(Unauthenticated):
        tickets.redeem(wrong, "vm-1")


class _HandedOutput:
    """A session whose output the test hands over read by read (b"" is its end)."""

    def __init__(self) -> None:
        self.reads: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self) -> bytes:
        return await self.reads.get()


def test_streaming_output_goes_in_few_frames_and_an_echo_at_once() -> None:
    async def scenario() -> None:
        session = _HandedOutput()
        # A wait no loaded host outlasts, so that what comes within it is sure to join.
        frames = output_frames(session, wait=30.0)  # type: ignore[arg-type]  # only read()
        big = b"o" * STREAMING

        session.reads.put_nowait(b"k")  # an echo: sent alone, nothing waited for
        assert await anext(frames) == b"k"
        # Output streaming: what is already there, and what comes meanwhile, joins it...
        for piece in (big, b"1" * 100, b"2" * 100):
            session.reads.put_nowait(piece)
        asyncio.get_running_loop().call_later(0.01, session.reads.put_nowait, b"3")
        # ... up to MAX_FRAME: a frame ends once it holds that much.
        chunk = b"c" * (64 * 1024)
        asyncio.get_running_loop().call_later(0.05, _hand, session, [chunk] * 6)
        joined = await anext(frames)
        head = big + b"1" * 100 + b"2" * 100 + b"3"
        assert joined.startswith(head) and len(joined) >= MAX_FRAME
        assert len(joined) < MAX_FRAME + len(chunk)
        rest = len(head) + 6 * len(chunk) - len(joined)
        # The end, while bytes are held: they go first, then the frames end.
        session.reads.put_nowait(b"")
        assert await anext(frames) == b"c" * rest
        assert await anext(frames, None) is None

        # Nothing more comes: the held bytes go once the wait is over; no read is lost to it.
        session = _HandedOutput()
        frames = output_frames(session, wait=0.01)  # type: ignore[arg-type]
        session.reads.put_nowait(big)
        assert await anext(frames) == big
        session.reads.put_nowait(b"after")
        assert await anext(frames) == b"after"

    asyncio.run(scenario())


def _hand(session: _HandedOutput, reads: list[bytes]) -> None:
    for data in reads:
        session.reads.put_nowait(data)


def _ed25519_key(kind: str = "ssh-ed25519", comment: str = "me@laptop") -> str:
    """An OpenSSH public key line; ``kind`` as its first field, whatever its data says."""
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (b"ssh-ed25519", bytes(32)))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}".strip()


def test_ssh_logins_are_refused_clearly(shells: Cluster) -> None:
    """`POST /instances/NAME/ssh`: what the master refuses, and a driver whose guests take no
    SSH logins (the fake's), which an interactive `shell` then goes around."""
    admin = {"Authorization": f"Bearer {shells.token}"}

    def login(name: str, key: object, headers: dict[str, str] = admin) -> httpx.Response:
        return shells.http.post(
            f"{shells.api}/api/v1/instances/{name}/ssh", json={"public_key": key}, headers=headers
        )

    good = _ed25519_key()
    refused = login("primary", good)
    assert refused.status_code == 502, refused.text
    assert refused.json()["error"]["code"] == "driver_error"
    assert "take no SSH logins" in refused.json()["error"]["message"]
    assert login("ghost", good).status_code == 404
    assert login("resting", good).status_code == 409
    assert login("primary", good, headers={}).status_code == 401
    viewer = shells.ok("token", "create", "--api", "--role", "viewer").out.strip()
    assert login("primary", good, {"Authorization": f"Bearer {viewer}"}).status_code == 403
    for bad in (
        "",
        "not a key",
        "ssh-ed25519",
        _ed25519_key(kind="ssh-rsa"),  # says RSA, holds an Ed25519 key
        f'command="/bin/sh" {good}',  # options: the line must be the key alone
        good.replace(" me@laptop", "\nssh-ed25519 AAAA other"),  # a second line
        "ssh-ed25519 AAAA$$$$",
        "ssh-ed25519 " + "A" * 20000,
        42,
    ):
        answer = login("primary", bad)
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["code"] == "invalid_argument"

    # On a terminal the CLI asks, hears the driver takes none, and opens a session instead.
    child = spawn_shell(shells, "primary")
    child.expect("take no SSH logins; the session goes through Multiverse")
    child.expect(STRAIGHT)
    child.sendline("exit 5")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 5
    # The session's own request says a refusal, and the exit code is its, as before.
    for name, why in (("ghost", "does not exist"), ("resting", "not Running")):
        child = spawn_shell(shells, name)
        child.expect(why)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 2, name
