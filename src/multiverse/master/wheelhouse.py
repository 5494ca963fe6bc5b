"""The wheelhouse: the wheel of the running Multiverse and the wheels of its dependencies.

`node add` copies it to the new host, which then installs from it with ``pip --no-index``: the
host needs no package index and gets exactly the code the master runs. Built once per version
and source digest (``pip wheel`` of the source tree the master runs from) and cached under the
master's data directory; later builds of the same code are a directory lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import multiverse
from multiverse import __version__
from multiverse.core.errors import Unavailable

log = logging.getLogger("multiverse.master")

__all__ = ["Wheelhouse", "source_digest", "source_root"]

_COMPLETE = ".complete"  # written last: a directory without it is a build that broke


def source_root() -> Path | None:
    """The project's source tree when Multiverse runs from one (an editable install)."""
    root = Path(multiverse.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else None


def source_digest(root: Path) -> str:
    """SHA-256 over what goes into the wheel: pyproject.toml and the package's files."""
    digest = hashlib.sha256()
    package = sorted(
        path
        for path in (root / "src" / "multiverse").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
    for path in [root / "pyproject.toml", *package]:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


class Wheelhouse:
    """Wheels for `node add`, cached in ``cache_dir/<version>-<digest>/``."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()

    def key(self) -> str:
        root = source_root()
        if root is None:
            raise Unavailable(
                "this master does not run from a source tree, so it cannot build the wheelhouse "
                "for `node add`; install Multiverse with `pip install -e` from its source"
            )
        return f"{__version__}-{source_digest(root)[:16]}"

    async def ensure(self) -> Path:
        """The directory of wheels, built first if this code has none yet."""
        async with self._lock:
            target = self.cache_dir / self.key()
            if (target / _COMPLETE).exists():
                return target
            root = source_root()
            assert root is not None  # key() said so
            building = target.with_name(target.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            log.info("building the wheelhouse for node add in %s", target)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(building),
                str(root),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            )  # fmt: skip
            output, _ = await process.communicate()
            if process.returncode != 0:
                shutil.rmtree(building, ignore_errors=True)
                tail = "\n".join(output.decode(errors="replace").splitlines()[-10:])
                raise Unavailable(f"building the wheelhouse failed:\n{tail}")
            (building / _COMPLETE).write_text(__version__)
            shutil.rmtree(target, ignore_errors=True)
            building.rename(target)
            for older in self.cache_dir.iterdir():  # other code's wheels: never copied again
                if older != target:
                    shutil.rmtree(older, ignore_errors=True)
            return target

    @staticmethod
    def wheels(directory: Path) -> list[Path]:
        return sorted(directory.glob("*.whl"))
