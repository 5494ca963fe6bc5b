"""The ``multiverse`` executable: every command by name and the module it lives in, and how a
call ends (its exit code and message).

A call imports this table, the parser (``client/cmdline.py``) and its own command's module,
nothing else: the client's commands (``client/``) speak only HTTP, the servers'
(``servers.py``) start a master or a worker, and neither is loaded for the other.
"""

from __future__ import annotations

import contextlib
import os
import sys

from multiverse import __version__
from multiverse.client import cmdline
from multiverse.client.errors import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ApiError,
    Failure,
    Unreachable,
)
from multiverse.core.errors import MultiverseError

_INSTANCES = "multiverse.client.instances"
_ENVIRONMENTS = "multiverse.client.environments"
_NODES = "multiverse.client.nodes"
_SERVERS = "multiverse.servers"

COMMANDS = {
    "launch": f"{_INSTANCES}:launch",
    "instances": f"{_INSTANCES}:instances_",
    "list": f"{_INSTANCES}:instances_",
    "ls": f"{_INSTANCES}:instances_",
    "info": f"{_INSTANCES}:info",
    "start": f"{_INSTANCES}:start",
    "stop": f"{_INSTANCES}:stop",
    "restart": f"{_INSTANCES}:restart",
    "delete": f"{_INSTANCES}:delete",
    "shell": f"{_INSTANCES}:shell",
    "exec": f"{_INSTANCES}:exec_",
    "logs": f"{_INSTANCES}:logs",
    "move": f"{_INSTANCES}:move",
    "events": f"{_INSTANCES}:events",
    "apply": f"{_ENVIRONMENTS}:apply",
    "diff": f"{_ENVIRONMENTS}:diff",
    "envs": f"{_ENVIRONMENTS}:envs",
    "get": f"{_ENVIRONMENTS}:get",
    "nodes": f"{_NODES}:nodes",
    "node": f"{_NODES}:node",
    "masters": f"{_NODES}:masters",
    "network": f"{_NODES}:network",
    "fault": "multiverse.client.faults:fault",
    "token": "multiverse.client.tokens:token",
    "images": "multiverse.client.images:images",
    "image": "multiverse.client.images:image",
    "master": f"{_SERVERS}:master",
    "worker": f"{_SERVERS}:worker",
    "up": f"{_SERVERS}:up",
    "down": f"{_SERVERS}:down",
}


def _version(_ctx: cmdline.Context, _param: cmdline.Parameter, value: bool) -> None:
    if value:
        cmdline.echo(f"multiverse, version {__version__}")
        raise cmdline.Exit(0)


@cmdline.group(name="multiverse", lazy=COMMANDS)
@cmdline.option("--version", is_flag=True, callback=_version, help="Show the version and exit.")
def cli(version: bool) -> None:
    """Multiverse: launch and manage virtual machines on many hosts from one place."""


def run(command: cmdline.Command, args: list[str] | None = None) -> int:
    """Run ``command`` on ``args`` (the process's by default) with Multipass's exit codes and
    messages on stderr; returns the code."""
    try:
        result = command.main(sys.argv[1:] if args is None else args, prog_name="multiverse")
        return result if isinstance(result, int) else 0
    except cmdline.Exit as exc:
        return exc.code
    except cmdline.CommandError as exc:
        exc.show()
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`multiverse ls | head -1`): end quietly, as a pipe's writer
        # does, with stdout on /dev/null so that the interpreter's last flush does not fail.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted.\n")
        return EXIT_USAGE
    except Unreachable as exc:
        sys.stderr.write(f"{exc}\nIs the master running? Start one with `multiverse up`.\n")
        return EXIT_UNREACHABLE
    except (ApiError, Failure, MultiverseError) as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_FAILED


def main() -> None:
    sys.exit(run(cli))
