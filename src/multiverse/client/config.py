"""Where the CLI finds its master and token.

``MULTIVERSE_SERVER`` / ``MULTIVERSE_TOKEN`` win; else the file named by ``MULTIVERSE_CONFIG``;
else ``~/.config/multiverse/config.toml``, which the master writes on its first start.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "multiverse" / "config.toml"


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str
    source: str  # where it came from, for error messages

    @staticmethod
    def load() -> ClientConfig:
        named = os.environ.get("MULTIVERSE_CONFIG")
        path = Path(named) if named else user_config_path()
        values: dict[str, object] = {}
        if path.exists():
            try:
                values = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, OSError) as exc:
                raise ValueError(f"cannot read {path}: {exc}") from exc
        elif named:
            raise ValueError(f"MULTIVERSE_CONFIG names {path}, which does not exist")
        return ClientConfig(
            server=os.environ.get("MULTIVERSE_SERVER") or str(values.get("server", "")),
            token=os.environ.get("MULTIVERSE_TOKEN") or str(values.get("token", "")),
            source=str(path),
        )
