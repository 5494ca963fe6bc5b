"""The ``multiverse`` executable: every command by name, and the module it lives in.

A call imports click, this table and its own command's module, nothing else: the client's
commands (``client/``) speak only HTTP, the servers' (``servers.py``) start a master or a
worker, and neither is loaded for the other.
"""

from __future__ import annotations

import sys

import click

from multiverse import __version__
from multiverse.client.cli import LazyGroup, run

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


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
def cli() -> None:
    """Multiverse: launch and manage virtual machines on many hosts from one place."""


def main() -> None:
    sys.exit(run(cli))
