"""VMs through Canonical Multipass: the ``multipass`` CLI with ``--format json``.

Multipass keeps its own instances (its daemon owns the VMs), so this driver keeps almost
nothing: under ``state_dir/created/<uuid>.json`` the configs of VMs that were created but not
launched yet. Multipass has no "define without booting": ``launch`` creates and boots at once, so
:meth:`MultipassDriver.create` only validates and records, and the first ``start`` launches.
Instances are found by name: a Multiverse instance named ``web-1`` is the Multipass instance
``web-1`` (both follow the same naming rules, checked by core before the driver sees a name).

What the CLI may answer, from Multipass' own sources and docs, and how it maps:

- exit 0: success; ``list``/``info`` print JSON whose fields have mixed types (counts and disk
  sizes as strings, memory as integers) and are left out when unknown;
- exit 1: command-line error -> :class:`InvalidArgument` (a bug on our side, or a too-old CLI);
- exit 2: the command failed. The client prints ``<command> failed: <reason>`` for everything the
  daemon (or the connection to it) refused, so the reason decides: "cannot connect to the
  multipass socket", "multipass socket access denied" and "The client is not authenticated"
  (daemon down, or refusing this client) -> :class:`Unavailable`; "Invalid arguments supplied"
  (the daemon's check of name, memory, disk) -> :class:`InvalidArgument`; "does not exist" ->
  :class:`NotFound`; "already exists" -> :class:`AlreadyExists`; "not running", "deleted" ->
  :class:`Conflict`; anything else :class:`DriverError`;
- exit 5: ``--timeout`` passed (the client's own timer) -> :class:`Unavailable`.

``launch`` and ``start`` get ``--timeout`` (the client's wait for the instance to come up); our
own limit on the client process is longer, so Multipass' answer arrives before we give up.
User data goes to ``launch --cloud-init -`` on stdin, never in a file: the snap's confinement
cannot read files outside a non-hidden home directory. Multipass takes only cloud-config (a
YAML mapping), so :meth:`MultipassDriver.validate` refuses anything else up front.

``exec`` and ``shell`` on a stopped instance: Multipass' client starts the instance first;
Multiverse does not. A stopped VM stays stopped until the user starts it, as with the other
drivers, so :meth:`exec` and :meth:`open_session` refuse with :class:`Conflict` ("is stopped;
start it first") before they run the client.

Malformed output (truncated JSON, a missing ``state``, a state we do not know) never escapes as a
Python exception: :meth:`status` raises a :class:`DriverError` saying what Multipass printed, and
the agent's ``observe()`` turns any MultiverseError from ``status()`` into the instance state
``Unknown`` with that message as the reason; the agent keeps running and tries again next sync.
Multipass' own ``Unknown`` state is reported the same way.

Interactive sessions run ``multipass shell NAME`` (or ``multipass exec NAME -- CMD``) on a local
pseudo-terminal: Multipass' client reads the terminal size from its PTY and follows SIGWINCH,
which the kernel sends when the
session's resize sets the PTY's window size (:class:`multiverse.drivers.localpty.LocalSession`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from multiverse.core.errors import (
    AlreadyExists,
    Conflict,
    DriverError,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
)
from multiverse.core.model import GuestStats, Resources
from multiverse.core.sizes import MiB, format_size
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

BINARY_ENV = "MULTIVERSE_MULTIPASS"

# Multipass' own floors (its launch refuses less).
MIN_MEMORY = 128 * MiB
MIN_DISK = 512 * MiB

# Multiverse image names that are not Multipass image names; anything else passes through
# unchanged ("22.04", "jammy", "daily:noble", a URL...). The cluster-wide default image is
# "tiny", the project's test guest, which Multipass cannot boot: the nearest is Ubuntu LTS.
DEFAULT_IMAGES: Mapping[str, str] = {"tiny": "lts", "ubuntu": "lts"}

# The exit codes of Multipass' client (its ReturnCode enum; 5 is its timeout_exit_code).
EXIT_OK, EXIT_COMMAND_LINE, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2, 5

# What the client says, after "<command> failed: ", when it cannot talk to the daemon.
_UNREACHABLE = (
    "cannot connect to the multipass socket",
    "multipass socket access denied",
    "the client is not authenticated",
)
# The daemon's answer to a launch whose name, memory or disk it refuses.
_INVALID = "invalid arguments supplied"

# How much longer than the ``--timeout`` we give Multipass we wait for its client to exit.
CLIENT_GRACE = 30.0

# Multipass' instance states, and what each says about the VM's power.
_RUNNING_STATES = {"Running", "Starting", "Restarting", "Delayed Shutdown", "Suspending"}
_STOPPED_STATES = {"Stopped", "Suspended"}
_MISSING_STATES = {"Deleted"}

_OUTPUT_IN_ERRORS = 600  # characters of Multipass' output quoted in an error message


class MultipassDriver(Driver):
    """Instances of the local Multipass daemon, driven through its CLI."""

    name = "multipass"

    def __init__(
        self,
        state_dir: Path,
        capacity: Resources | None = None,
        *,
        binary: str | None = None,
        images: Mapping[str, str] | None = None,
        command_timeout: float = 120.0,
        launch_timeout: float = 900.0,
        start_timeout: float = 300.0,
        list_ttl: float = 1.0,
    ) -> None:
        """``binary``: the multipass executable (default: $MULTIVERSE_MULTIPASS, else PATH).

        ``launch_timeout``/``start_timeout``: the ``--timeout`` given to ``multipass launch`` and
        ``multipass start`` (whole seconds); the client process gets :data:`CLIENT_GRACE` more.

        ``list_ttl``: how long one ``multipass list`` answers ``status()`` for every VM, so a
        sync of many VMs costs one CLI call, not one per VM.
        """
        super().__init__(state_dir)
        self._capacity = capacity
        self.binary = (
            binary or os.environ.get(BINARY_ENV) or shutil.which("multipass") or ("multipass")
        )
        self.image_aliases = dict(DEFAULT_IMAGES if images is None else images)
        self.command_timeout = command_timeout
        self.launch_timeout = launch_timeout
        self.start_timeout = start_timeout
        self.list_ttl = list_ttl
        self._created_dir = state_dir / "created"
        self._created_dir.mkdir(parents=True, exist_ok=True)
        self._listing: tuple[float, dict[str, dict[str, Any]]] | None = None

    # --- the Driver port -----------------------------------------------------------------

    async def images(self) -> list[ImageInfo]:
        """Our image names and the Multipass images they launch (Multipass downloads them)."""
        return [ImageInfo(name, f"multipass:{alias}") for name, alias in self.image_aliases.items()]

    async def capacity(self) -> Resources:
        return self._capacity or host_resources(self.state_dir)

    async def validate(self, vm: VMConfig) -> None:
        if vm.memory < MIN_MEMORY:
            raise InvalidArgument(
                f"memory {format_size(max(vm.memory, 0))} is too small: Multipass needs at "
                f"least {format_size(MIN_MEMORY)}"
            )
        if vm.disk < MIN_DISK:
            raise InvalidArgument(
                f"disk {format_size(max(vm.disk, 0))} is too small: Multipass needs at least "
                f"{format_size(MIN_DISK)}"
            )
        if not vm.name or vm.name.startswith("-"):
            raise InvalidArgument(f"invalid instance name {vm.name!r}")
        check_cloud_config(vm.user_data)

    async def create(self, vm: VMConfig) -> None:
        await self.validate(vm)
        if await self._find(vm.name) is not None:
            return  # launched already: nothing more to prepare
        record = self._created_file(vm)
        if not record.exists():
            _write_json(record, {"name": vm.name, "image": vm.image})

    async def start(self, vm: VMConfig) -> VMStatus:
        entry = await self._find(vm.name)
        if entry is None:
            if not self._created_file(vm).exists():
                raise NotFound(f"VM {vm.name} was never created on this node")
            await self._launch(vm)
        elif _state(entry) != "Running":
            await self._run_checked(*_with_timeout(["start", vm.name], self.start_timeout))
        self._listing = None
        status = await self.status(vm)
        if status.power != PowerState.RUNNING:
            raise DriverError(
                f"multipass started {vm.name} but lists it as {status.power.value}"
                + (f": {status.message}" if status.message else "")
            )
        return status

    async def stop(self, vm: VMConfig, force: bool = False) -> None:
        entry = await self._find(vm.name)
        if entry is None:
            if self._created_file(vm).exists():
                return  # created, never launched: as stopped as it gets
            raise NotFound(f"VM {vm.name} does not exist in Multipass")
        if _state(entry) in _STOPPED_STATES and not force:
            return
        await self._run_checked("stop", *(["--force"] if force else []), vm.name)
        self._listing = None

    async def restart(self, vm: VMConfig) -> VMStatus:
        """Reboot the guest (``multipass restart``); not part of the port, the CLI offers it."""
        await self._run_checked("restart", vm.name)
        self._listing = None
        return await self.status(vm)

    async def delete(self, vm: VMConfig) -> None:
        if await self._find(vm.name) is not None:
            # NotFound: gone between our list and our delete, which is what we wanted.
            with contextlib.suppress(NotFound):
                await self._run_checked("delete", "--purge", vm.name)
            self._listing = None
        self._created_file(vm).unlink(missing_ok=True)

    async def status(self, vm: VMConfig) -> VMStatus:
        entry = await self._find(vm.name)
        if entry is None:
            if self._created_file(vm).exists():
                return VMStatus(PowerState.STOPPED, message="created; launched on first start")
            return VMStatus(PowerState.MISSING)
        return _status_of(vm.name, entry)

    async def stats(self, vm: VMConfig) -> GuestStats:
        answer = await self._json("info", vm.name)
        info = answer.get("info")
        entry = info.get(vm.name) if isinstance(info, dict) else None
        if not isinstance(entry, dict):
            errors = answer.get("errors")
            raise DriverError(
                f"multipass info printed nothing about {vm.name}"
                + (f": {errors}" if errors else "")
            )
        state = entry.get("state")
        if state != "Running":
            raise Conflict(f"VM {vm.name} is not running (Multipass: {state or 'no state'})")
        return parse_info_stats(entry)

    async def exec(
        self, vm: VMConfig, command: Sequence[str], stdin: bytes = b""
    ) -> AsyncIterator[ExecChunk]:
        if not command:
            raise InvalidArgument("exec needs a command")
        await self._require_running(vm)
        process = await self._spawn(["exec", vm.name, "--", *command], stdin=True)
        assert process.stdin and process.stdout and process.stderr
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            process.stdin.write(stdin)
            await process.stdin.drain()
        process.stdin.close()
        queue: asyncio.Queue[ExecChunk | None] = asyncio.Queue(maxsize=16)

        async def pump(stream: asyncio.StreamReader, number: int) -> None:
            try:
                while data := await stream.read(65536):
                    await queue.put(ExecChunk(number, data))
            finally:
                await queue.put(None)

        pumps = [
            asyncio.create_task(pump(process.stdout, 1)),
            asyncio.create_task(pump(process.stderr, 2)),
        ]
        try:
            open_streams = len(pumps)
            while open_streams:
                chunk = await queue.get()
                if chunk is None:
                    open_streams -= 1
                else:
                    yield chunk
            # The command's own exit code: `multipass exec` passes it through.
            yield ExecChunk(exit_code=_exit_code(await process.wait()))
        finally:
            for task in pumps:
                task.cancel()
            await _end(process)

    async def open_session(
        self, vm: VMConfig, command: Sequence[str] | None, size: TerminalSize | None
    ) -> Session:
        await self._require_running(vm)
        if command:
            # Without a size, ``exec`` on pipes (like ``multiverse exec`` without -t).
            argv = ["exec", vm.name, "--", *command]
        else:
            argv, size = ["shell", vm.name], size or TerminalSize()  # a shell wants a terminal
        return await LocalSession.spawn([self.binary, *argv], size)

    # --- Multipass' CLI ------------------------------------------------------------------

    async def _launch(self, vm: VMConfig) -> None:
        argv = [
            "launch",
            "--name", vm.name,
            "--cpus", str(vm.cpus),
            "--memory", _size_argument(vm.memory),
            "--disk", _size_argument(vm.disk),
        ]  # fmt: skip
        if vm.user_data:
            argv += ["--cloud-init", "-"]
        argv.append(self.image_aliases.get(vm.image, vm.image))
        await self._run_checked(
            *_with_timeout(argv, self.launch_timeout),
            stdin=vm.user_data.encode() if vm.user_data else None,
        )
        self._created_file(vm).unlink(missing_ok=True)

    async def _find(self, name: str) -> dict[str, Any] | None:
        """The ``list`` entry of the instance ``name``; None if Multipass has none by that name."""
        now = time.monotonic()
        if self._listing is None or now - self._listing[0] > self.list_ttl:
            self._listing = (now, parse_list(await self._run_checked("list", "--format", "json")))
        return self._listing[1].get(name)

    async def _require_running(self, vm: VMConfig) -> None:
        self._listing = None
        entry = await self._find(vm.name)
        if entry is None:
            raise NotFound(f"VM {vm.name} does not exist in Multipass")
        state = _state(entry)
        if state in _STOPPED_STATES:
            raise Conflict(f"VM {vm.name} is stopped; start it first")
        if state != "Running":
            raise Conflict(f"VM {vm.name} is not running (Multipass: {state or '?'})")

    async def _json(self, *argv: str) -> dict[str, Any]:
        return parse_json(await self._run_checked(*argv, "--format", "json"), argv[0])

    async def _run_checked(self, *argv: str, stdin: bytes | None = None) -> str:
        """Run ``multipass ARGV``; its stdout, or the typed error its exit code stands for.

        With ``--timeout N`` in ``argv`` the client gets N + :data:`CLIENT_GRACE` seconds (so
        Multipass' own timeout answers first), else ``command_timeout``.
        """
        limit = self.command_timeout
        if "--timeout" in argv:
            limit = float(argv[argv.index("--timeout") + 1]) + CLIENT_GRACE
        process = await self._spawn(list(argv), stdin=stdin is not None)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(stdin), limit)
        except TimeoutError:
            await _end(process)
            raise Unavailable(f"multipass {argv[0]} did not finish within {limit:.0f} s") from None
        finally:
            await _end(process)
        code = process.returncode
        assert code is not None
        if code != EXIT_OK:
            raise error_for(argv[0], code, stderr.decode(errors="replace"))
        return stdout.decode(errors="replace")

    async def _spawn(self, argv: list[str], stdin: bool = False) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                self.binary,
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as error:
            raise Unavailable(
                f"cannot run {self.binary}: {error.strerror or error} (is Multipass installed? "
                f"set ${BINARY_ENV} to its path)"
            ) from None

    def _created_file(self, vm: VMConfig) -> Path:
        if "/" in vm.id or vm.id in ("", ".", ".."):
            raise InvalidArgument(f"invalid VM id {vm.id!r}")
        return self._created_dir / f"{vm.id}.json"


# --- Multipass' output, parsed (pure: the tests feed it every malformed shape) ---------------


def error_for(command: str, code: int, stderr: str) -> MultiverseError:
    """The typed error for a failed ``multipass COMMAND`` that exited with ``code``."""
    text = stderr.strip()[:_OUTPUT_IN_ERRORS] or "(no message)"
    if code == EXIT_COMMAND_LINE:
        return InvalidArgument(f"multipass {command} refused its arguments: {text}")
    if code == EXIT_TIMEOUT:
        return Unavailable(f"multipass {command} timed out: {text}")
    if code == EXIT_FAILED:
        lowered = text.lower()
        if any(words in lowered for words in _UNREACHABLE):
            return Unavailable(f"the Multipass daemon is unreachable: {text}")
        if _INVALID in lowered:
            return InvalidArgument(text)
        if "does not exist" in lowered:
            return NotFound(text)
        if "already exists" in lowered:
            return AlreadyExists(text)
        if "is not running" in lowered or "is deleted" in lowered:
            return Conflict(text)
        return DriverError(text)
    return DriverError(f"multipass {command} exited with code {code}: {text}")


def parse_json(text: str, command: str) -> dict[str, Any]:
    """The JSON object ``multipass COMMAND --format json`` printed, or a DriverError."""
    try:
        answer = json.loads(text)
    except ValueError as error:
        raise DriverError(
            f"multipass {command} printed malformed JSON ({error}): {_quote(text)}"
        ) from None
    if not isinstance(answer, dict):
        raise DriverError(f"multipass {command} printed JSON that is not an object: {_quote(text)}")
    return answer


def parse_list(text: str) -> dict[str, dict[str, Any]]:
    """``{"list": [{"name", "state", "ipv4", "release"}...]}`` -> entries by name.

    Entries without a name are dropped (nothing could be matched to them); anything else
    missing is judged later, by whoever needs that field.
    """
    answer = parse_json(text, "list")
    entries = answer.get("list")
    if not isinstance(entries, list):
        raise DriverError(f"multipass list printed no instance list: {_quote(text)}")
    return {
        entry["name"]: entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    }


def _state(entry: Mapping[str, Any]) -> str:
    state = entry.get("state")
    return state if isinstance(state, str) else ""


def _status_of(name: str, entry: Mapping[str, Any]) -> VMStatus:
    """The power state one ``list`` (or ``info``) entry tells; DriverError if it tells none."""
    state = _state(entry)
    if not state:
        raise DriverError(f"multipass lists {name} without a state")
    if state in _RUNNING_STATES:
        note = "" if state == "Running" else f"Multipass reports {state}"
        return VMStatus(PowerState.RUNNING, ipv4=first_ipv4(entry.get("ipv4")), message=note)
    if state in _STOPPED_STATES:
        return VMStatus(PowerState.STOPPED, message="" if state == "Stopped" else state)
    if state in _MISSING_STATES:
        return VMStatus(
            PowerState.MISSING,
            message=f"deleted in Multipass but not purged (`multipass recover {name}`)",
        )
    if state == "Unknown":
        raise DriverError(f"Multipass reports the state of {name} as Unknown")
    raise DriverError(f"Multipass reports {name} in a state Multiverse does not know: {state!r}")


def first_ipv4(value: Any) -> str:
    """The first address of an ``ipv4`` field (a list of strings; tolerate one string).

    Multipass fills the field with placeholders when it knows no address (``["N/A"]``, ``"--"``,
    ``"UNKNOWN"``): only a string that is an IPv4 address counts.
    """
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for item in items:
        if isinstance(item, str):
            with contextlib.suppress(ValueError):
                return str(ipaddress.IPv4Address(item.strip()))
    return ""


def check_cloud_config(user_data: str) -> None:
    """Refuse user data Multipass cannot take: it passes only a cloud-config YAML mapping."""
    if not user_data:
        return
    try:
        document = yaml.safe_load(user_data)
    except yaml.YAMLError as error:
        raise InvalidArgument(
            f"the multipass driver takes user-data only as cloud-config YAML: {error}"
        ) from None
    if not isinstance(document, dict):
        raise InvalidArgument(
            "the multipass driver takes user-data only as a cloud-config YAML mapping "
            "(#cloud-config with keys); scripts and other formats are not supported, got "
            f"{type(document).__name__ if document is not None else 'an empty document'}"
        )


def parse_info_stats(entry: Mapping[str, Any]) -> GuestStats:
    """GuestStats from one ``info`` entry; fields Multipass left out count as zero/empty."""
    load = entry.get("load")
    loads = (0.0, 0.0, 0.0)
    if isinstance(load, list) and len(load) >= 3:
        with contextlib.suppress(TypeError, ValueError):
            loads = (float(load[0]), float(load[1]), float(load[2]))
    memory = entry.get("memory")
    memory = memory if isinstance(memory, dict) else {}
    disk_used = disk_total = 0
    disks = entry.get("disks")
    if isinstance(disks, dict):
        for disk in disks.values():
            if isinstance(disk, dict):
                disk_used += _number(disk.get("used"))
                disk_total += _number(disk.get("total"))
    release = entry.get("release") or entry.get("image_release") or ""
    return GuestStats(
        load=loads,
        memory_used=_number(memory.get("used")),
        memory_total=_number(memory.get("total")),
        disk_used=disk_used,
        disk_total=disk_total,
        release=release if isinstance(release, str) else "",
        ipv4=first_ipv4(entry.get("ipv4")),
    )


def _number(value: Any) -> int:
    """Multipass prints some numbers as strings ("5116440064") and others as integers."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return max(int(value), 0)
    return 0


def _with_timeout(argv: list[str], seconds: float) -> list[str]:
    """``argv`` with ``--timeout`` in whole seconds (Multipass takes a positive integer)."""
    return [*argv, "--timeout", str(max(int(seconds), 1))]


def _size_argument(size: int) -> str:
    """Multipass reads sizes with K/M/G suffixes; whole MiB keeps the number short."""
    return f"{size // MiB}M" if size % MiB == 0 else str(size)


def _quote(text: str) -> str:
    text = text.strip()
    if not text:
        return "(nothing)"
    return repr(text[:_OUTPUT_IN_ERRORS] + ("..." if len(text) > _OUTPUT_IN_ERRORS else ""))


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


async def _end(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data) + "\n")
    temporary.replace(path)
