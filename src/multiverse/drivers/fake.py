"""The fake hypervisor: no VMs, the real state machine, for tests and scale simulations.

Its "hypervisor state" lives in ``state_dir/vms.json``, apart from the agent's records, the way
QEMU processes live apart from the agent: a restarted agent finds its fake VMs still running.
``exec`` runs the command on this host in the VM's directory, so the exec path through the
whole cluster can be tested without booting anything; the VM's user-data is the file
``user-data`` there, as a guest would have it. That makes it a test tool: it is refused
unless ``MULTIVERSE_ALLOW_FAKE=1`` is set, and its commands get a guest's few variables, never
the worker's environment (which may hold the join token). A VM whose directory holds a
``fail-start`` file fails each start, as a guest that does not come up would: tests make boots
fail with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from multiverse.core.errors import Conflict, DriverError, InvalidArgument, NotFound
from multiverse.core.files import write_private
from multiverse.core.model import GuestStats, Resources
from multiverse.drivers.base import (
    Driver,
    ExecChunk,
    ImageInfo,
    PowerState,
    Session,
    TerminalSize,
    VMConfig,
    VMStatus,
    host_resources,
)
from multiverse.drivers.localpty import LocalSession

KNOWN_IMAGES = ("tiny", "ubuntu", "debian")
ALLOW_ENV = "MULTIVERSE_ALLOW_FAKE"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FAIL_START = "fail-start"


def require_allowed() -> None:
    """Refuse the fake driver where nobody asked for it: its VMs' commands run on this host."""
    if os.environ.get(ALLOW_ENV) != "1":
        raise InvalidArgument(
            f"the fake driver is a test tool that runs commands on this host; "
            f"set {ALLOW_ENV}=1 to use it"
        )


class FakeDriver(Driver):
    name = "fake"

    def __init__(
        self, state_dir: Path, capacity: Resources | None = None, delay: float = 0.0
    ) -> None:
        require_allowed()
        super().__init__(state_dir)
        self._capacity = capacity
        self.delay = delay
        self._file = state_dir / "vms.json"
        self._vms: dict[str, dict[str, Any]] = (
            json.loads(self._file.read_text()) if self._file.exists() else {}
        )

    def _save(self) -> None:
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._vms))
        os.replace(tmp, self._file)

    def _vm(self, vm: VMConfig) -> dict[str, Any]:
        try:
            return self._vms[vm.id]
        except KeyError:
            raise NotFound(f"no VM {vm.name} on this host") from None

    async def capacity(self) -> Resources:
        return self._capacity or host_resources(self.state_dir)

    async def images(self) -> list[ImageInfo]:
        return [ImageInfo(name, "fake") for name in KNOWN_IMAGES]

    async def validate(self, vm: VMConfig) -> None:
        if vm.image not in KNOWN_IMAGES:
            raise NotFound(f"image {vm.image!r} does not exist; known: {', '.join(KNOWN_IMAGES)}")

    async def create(self, vm: VMConfig) -> None:
        await self.validate(vm)
        if vm.id not in self._vms:
            await asyncio.sleep(self.delay)
            (self.state_dir / "vms" / vm.id).mkdir(parents=True, exist_ok=True)
            write_private(self.state_dir / "vms" / vm.id / "user-data", vm.user_data.encode())
            self._vms[vm.id] = {"power": PowerState.STOPPED.value, "ipv4": _fake_ip(vm.id)}
            self._save()

    async def start(self, vm: VMConfig) -> VMStatus:
        record = self._vm(vm)
        if record["power"] != PowerState.RUNNING:
            await asyncio.sleep(self.delay)
            if (self.state_dir / "vms" / vm.id / FAIL_START).exists():
                raise DriverError(f"VM {vm.name} did not come up ({FAIL_START} in its directory)")
            record["power"] = PowerState.RUNNING.value
            self._save()
        return await self.status(vm)

    async def stop(self, vm: VMConfig, force: bool = False) -> None:
        record = self._vm(vm)
        if record["power"] != PowerState.STOPPED:
            await asyncio.sleep(0 if force else self.delay)
            record["power"] = PowerState.STOPPED.value
            self._save()

    async def delete(self, vm: VMConfig) -> None:
        if self._vms.pop(vm.id, None) is not None:
            await asyncio.sleep(self.delay)
            self._save()
        directory = self.state_dir / "vms" / vm.id
        shutil.rmtree(directory, ignore_errors=True)  # a guest's files may sit in subdirectories

    async def status(self, vm: VMConfig) -> VMStatus:
        record = self._vms.get(vm.id)
        if record is None:
            return VMStatus(PowerState.MISSING)
        power = PowerState(record["power"])
        return VMStatus(power, ipv4=record["ipv4"] if power == PowerState.RUNNING else "")

    async def stats(self, vm: VMConfig) -> GuestStats:
        if self._vm(vm)["power"] != PowerState.RUNNING:
            raise Conflict(f"instance {vm.name} is not running")
        # Stable made-up numbers, so tests can tell they came through the whole path.
        seed = int(hashlib.sha256(vm.id.encode()).hexdigest()[:8], 16)
        return GuestStats(
            load=(round((seed % 100) / 100, 2), 0.05, 0.01),
            memory_used=vm.memory // 4 + seed % 1024 * 1024,
            memory_total=vm.memory,
            disk_used=vm.disk // 10,
            disk_total=vm.disk,
            release="Fake 1.0",
            ipv4=_fake_ip(vm.id),
        )

    # --- cold moves (base.Migratable): the VM's directory is its "disk" ---------------------

    def export_files(self, vm: VMConfig) -> dict[str, Path]:
        if self._vm(vm)["power"] != PowerState.STOPPED:
            raise Conflict(f"VM {vm.name} is running; a cold move needs it stopped")
        directory = self.state_dir / "vms" / vm.id
        return {
            str(path.relative_to(directory)): path
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }

    def incoming_dir(self, vm: VMConfig) -> Path:
        return self.state_dir / "incoming" / vm.id

    async def adopt_incoming(self, vm: VMConfig) -> None:
        incoming, directory = self.incoming_dir(vm), self.state_dir / "vms" / vm.id
        if incoming.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.replace(incoming, directory)
        if vm.id not in self._vms:
            self._vms[vm.id] = {"power": PowerState.STOPPED.value, "ipv4": _fake_ip(vm.id)}
            self._save()

    async def abort_incoming(self, vm: VMConfig) -> None:
        shutil.rmtree(self.incoming_dir(vm), ignore_errors=True)

    def _environment(self, vm: VMConfig) -> dict[str, str]:
        """What a command in a fake VM sees: a guest's variables, none of the worker's."""
        return {"PATH": GUEST_PATH, "HOME": str(self.state_dir / "vms" / vm.id), "LANG": "C.UTF-8"}

    async def open_session(
        self, vm: VMConfig, command: Sequence[str] | None, size: TerminalSize | None
    ) -> Session:
        if self._vm(vm)["power"] != PowerState.RUNNING:
            raise Conflict(f"instance {vm.name} is not running; start it with `multiverse start`")
        return await LocalSession.spawn(
            list(command) if command else ["/bin/sh", "-i"] if size else ["/bin/sh"],
            size,
            cwd=self.state_dir / "vms" / vm.id,
            env={**self._environment(vm), "PS1": f"{vm.name}$ "},
        )

    async def exec(
        self, vm: VMConfig, command: Sequence[str], stdin: bytes = b""
    ) -> AsyncIterator[ExecChunk]:
        if self._vm(vm)["power"] != PowerState.RUNNING:
            raise Conflict(f"instance {vm.name} is not running; start it with `multiverse start`")
        if not command:
            raise InvalidArgument("no command given")
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=self.state_dir / "vms" / vm.id,
                env=self._environment(vm),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            yield ExecChunk(2, f"{command[0]}: {exc.strerror}\n".encode())
            yield ExecChunk(exit_code=127)
            return
        assert process.stdin and process.stdout and process.stderr
        process.stdin.write(stdin)
        process.stdin.close()
        queue: asyncio.Queue[ExecChunk | None] = asyncio.Queue(maxsize=16)

        async def pump(stream: asyncio.StreamReader, number: int) -> None:
            while data := await stream.read(65536):
                await queue.put(ExecChunk(number, data))
            await queue.put(None)

        pumps = [
            asyncio.create_task(pump(process.stdout, 1)),
            asyncio.create_task(pump(process.stderr, 2)),
        ]
        try:
            open_streams = 2
            while open_streams:
                chunk = await queue.get()
                if chunk is None:
                    open_streams -= 1
                else:
                    yield chunk
            yield ExecChunk(exit_code=await process.wait())
        finally:
            for task in pumps:
                task.cancel()
            if process.returncode is None:
                process.kill()
                await process.wait()


def _fake_ip(instance_id: str) -> str:
    digest = hashlib.sha256(instance_id.encode()).digest()
    return f"10.{200 + digest[0] % 50}.{digest[1]}.{2 + digest[2] % 250}"
