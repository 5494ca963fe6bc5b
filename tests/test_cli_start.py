"""The CLI loads only what a command needs, and ``exec`` streams output as the command makes it.

What a command imported is read from ``python -X importtime`` of a real ``multiverse`` process:
each line there names one module the process imported.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

from harness import Cluster, wait_until

# Heavy or server-side: never needed to print a version, help, or to run a command on a VM.
SERVER_SIDE = ("multiverse.master", "multiverse.worker", "multiverse.drivers", "multiverse.store",
               "multiverse.wire", "multiverse.guest", "grpc", "fastapi", "uvicorn", "sqlalchemy",
               "asyncssh", "cryptography")  # fmt: skip
NOT_FOR_EXEC = ("httpx", "rich", "websockets", "yaml", "asyncio", "pygments", *SERVER_SIDE)
# The core's models and parsers (dataclasses, enums, regexes: ~10 ms of a start), loaded by the
# options that parse with them only.
PARSERS = ("multiverse.core.model", "multiverse.core.network", "multiverse.core.faults")
NOT_FOR_VERSION = ("http", "ssl", *PARSERS, *NOT_FOR_EXEC)
# The modules of the commands (multiverse.main names where each is): a call loads its own.
COMMAND_MODULES = tuple(
    f"multiverse.{name}"
    for name in ("servers", "client.instances", "client.nodes", "client.faults",
                 "client.tokens", "client.images", "client.environments")
)  # fmt: skip


def imported_by(args: list[str], env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """The modules ``multiverse ARGS`` imported, and its stdout."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "multiverse", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules = set(re.findall(r"^import time:\s*\d+ \|\s*\d+ \|\s*(\S+)$", done.stderr, re.M))
    assert "multiverse.main" in modules  # the parse found the lines
    return modules, done.stdout


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in packages or m.startswith(packages))


def test_version_and_help_import_no_client_libraries_and_no_server_side() -> None:
    for args in (["--version"], ["--help"], ["launch", "--help"], ["exec", "--help"]):
        modules, out = imported_by(args)
        assert loaded(modules, NOT_FOR_VERSION) == [], args
        assert out
    assert "version 0.1.0" in imported_by(["--version"])[1]


def test_a_command_loads_its_own_module_and_no_other_commands() -> None:
    modules, _ = imported_by(["--version"])
    assert loaded(modules, COMMAND_MODULES) == []
    for args, own in (
        (["exec", "--help"], "multiverse.client.instances"),
        (["token", "create", "--help"], "multiverse.client.tokens"),
        (["master", "--help"], "multiverse.servers"),
    ):
        modules, out = imported_by(args)
        assert loaded(modules, COMMAND_MODULES) == [own], args
        assert "Usage: multiverse" in out
    # `image build` is the servers' side, found through the client's `image` group.
    modules, out = imported_by(["image", "build", "tiny", "--help"])
    assert loaded(modules, COMMAND_MODULES) == ["multiverse.client.images", "multiverse.servers"]
    assert "--images-dir" in out
    # Help lists every command with its summary, so it loads them all.
    modules, out = imported_by(["--help"])
    assert loaded(modules, COMMAND_MODULES) == sorted(COMMAND_MODULES)
    assert "exec " in out and "worker " in out and "token " in out


def test_launch_and_exec_load_only_an_http_client_and_exec_streams_output(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a")
    # Waiting for Running shows a spinner on a terminal only; to a pipe it loads no rich.
    modules, out = imported_by(["launch", "--name", "box"], cluster.env)
    assert "Launched: box" in out
    assert loaded(modules, NOT_FOR_EXEC) == []

    modules, out = imported_by(["exec", "box", "--", "echo", "hi"], cluster.env)
    assert out == "hi\n"
    assert "http.client" in modules
    assert loaded(modules, (*PARSERS, *NOT_FOR_EXEC)) == []

    # The command prints, then waits for a file the test makes only once that first line has
    # reached the CLI's stdout: output that waited for the command's end would never arrive.
    instance = cluster.instances()["box"]
    go = cluster.root / "node-a" / "fake" / "vms" / instance["id"] / "go"
    script = "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second"
    process = subprocess.Popen(
        [sys.executable, "-m", "multiverse", "exec", "box", "--", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cluster.env,
    )
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, b"")))
    try:
        reader.start()
        wait_until(lambda: lines, timeout=60)
        assert lines == [b"first\n"] and process.poll() is None
        Path(go).touch()
        assert process.wait(timeout=60) == 0
        reader.join(timeout=60)
        assert lines == [b"first\n", b"second\n"]
    finally:
        process.kill()
        process.wait()
        reader.join(timeout=10)
