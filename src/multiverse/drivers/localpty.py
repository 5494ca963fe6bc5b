"""A session with a process on this host, on a PTY or on pipes.

The fake driver's shell is a local ``/bin/sh`` and Multipass's is ``multipass shell`` run
locally; both are this one class, so the relay above them is tested the same way for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
from collections.abc import Sequence
from pathlib import Path

from multiverse.core.errors import DriverError
from multiverse.drivers.base import TerminalSize

_CHUNK = 65536


def _set_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


class LocalSession:
    """A :class:`multiverse.drivers.base.Session` with a process on this host."""

    def __init__(self, process: asyncio.subprocess.Process, pty_fd: int | None) -> None:
        self._process = process
        self._pty = pty_fd

    @classmethod
    async def spawn(
        cls,
        command: Sequence[str],
        size: TerminalSize | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> LocalSession:
        """``env`` is the whole environment of the process, not additions to this one's: what
        runs in a fake VM must not see the worker's secrets. Default: this process's."""
        environment = dict(os.environ if env is None else env)
        try:
            if size is None:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    cwd=cwd,
                    env=environment,
                    start_new_session=True,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                return cls(process, None)
            primary, secondary = os.openpty()
            _set_size(secondary, size)
            environment.setdefault("TERM", "xterm-256color")
            try:
                # util-linux's setsid makes the PTY the controlling terminal of a new session;
                # a preexec_fn doing the same is unsafe in a threaded (gRPC) process and
                # crashed the child here.
                process = await asyncio.create_subprocess_exec(
                    "setsid",
                    "--ctty",
                    *command,
                    cwd=cwd,
                    env=environment,
                    stdin=secondary,
                    stdout=secondary,
                    stderr=secondary,
                )
            except BaseException:
                os.close(primary)
                raise
            finally:
                os.close(secondary)
        except OSError as exc:
            raise DriverError(f"cannot start {command[0]}: {exc.strerror}") from exc
        os.set_blocking(primary, False)
        return cls(process, primary)

    async def _ready(self, writer: bool) -> None:
        assert self._pty is not None
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writer:
            loop.add_writer(self._pty, wake)
        else:
            loop.add_reader(self._pty, wake)
        try:
            await ready
        finally:
            (loop.remove_writer if writer else loop.remove_reader)(self._pty)

    async def read(self) -> bytes:
        if self._pty is None:
            assert self._process.stdout is not None
            return await self._process.stdout.read(_CHUNK)
        while True:
            try:
                return os.read(self._pty, _CHUNK)
            except BlockingIOError:
                await self._ready(writer=False)
            except OSError:  # EIO: every holder of the PTY's other end has gone
                return b""

    async def write(self, data: bytes) -> None:
        if self._pty is None:
            assert self._process.stdin is not None
            with contextlib.suppress(ConnectionError):
                self._process.stdin.write(data)
                await self._process.stdin.drain()
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._pty, view) :]
            except BlockingIOError:
                await self._ready(writer=True)
            except OSError:
                return  # the process is gone; its exit code tells the rest

    async def close_input(self) -> None:
        if self._pty is None:
            if self._process.stdin is not None and not self._process.stdin.is_closing():
                self._process.stdin.close()
        else:
            await self.write(b"\x04")  # the terminal's end-of-file character

    async def resize(self, cols: int, rows: int) -> None:
        if self._pty is not None:
            _set_size(
                self._pty, TerminalSize(cols, rows)
            )  # the kernel tells the foreground process (SIGWINCH)

    async def wait(self) -> int:
        code = await self._process.wait()
        return 128 - code if code < 0 else code

    async def close(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGHUP)
            try:
                await asyncio.wait_for(self._process.wait(), 2)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                await self._process.wait()
        if self._pty is not None:
            os.close(self._pty)
            self._pty = None
