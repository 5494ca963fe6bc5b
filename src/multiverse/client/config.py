"""Where the CLI finds its master and token.

``MULTIVERSE_SERVER`` / ``MULTIVERSE_TOKEN`` win; else the file named by ``MULTIVERSE_CONFIG``;
else ``~/.config/multiverse/config.toml``, which the master writes on its first start.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from pathlib import Path


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "multiverse" / "config.toml"


def config_path() -> Path:
    """The config file in use, whether it exists or not: ``MULTIVERSE_CONFIG``'s, else the
    user's. Files the CLI keeps for itself (its SSH login key) live beside it."""
    named = os.environ.get("MULTIVERSE_CONFIG")
    return Path(named) if named else user_config_path()


class ClientConfig:
    """A master's address, a token, and the CA the master's certificate must come from.

    A plain class, not a dataclass: dataclasses imports inspect, ~10% of a command's start."""

    def __init__(self, server: str, token: str, source: str, ca_certificate: str = "") -> None:
        self.server = server
        self.token = token
        self.source = source  # where it came from, for error messages
        self.ca_certificate = ca_certificate  # PEM

    def ssl_context(self) -> ssl.SSLContext | bool:
        """Trust exactly the cluster's CA when the config names one, else the system's."""
        if not self.ca_certificate:
            return True
        return ssl.create_default_context(cadata=self.ca_certificate)

    @staticmethod
    def from_file(path: Path) -> ClientConfig:
        values = tomllib.loads(path.read_text())
        return ClientConfig(
            server=str(values.get("server", "")),
            token=str(values.get("token", "")),
            source=str(path),
            ca_certificate=str(values.get("ca_certificate", "")),
        )

    @staticmethod
    def load() -> ClientConfig:
        named = os.environ.get("MULTIVERSE_CONFIG")
        path = config_path()
        found = ClientConfig("", "", str(path))
        if path.exists():
            try:
                found = ClientConfig.from_file(path)
            except (tomllib.TOMLDecodeError, OSError) as exc:
                raise ValueError(f"cannot read {path}: {exc}") from exc
        elif named:
            raise ValueError(f"MULTIVERSE_CONFIG names {path}, which does not exist")
        return ClientConfig(
            server=os.environ.get("MULTIVERSE_SERVER") or found.server,
            token=os.environ.get("MULTIVERSE_TOKEN") or found.token,
            source=found.source,
            ca_certificate=found.ca_certificate,
        )
