"""The Driver port: what the worker agent needs from a hypervisor.

A driver is told about one VM at a time by its :class:`VMConfig` and keeps whatever it needs to
find that VM again (pid files, sockets, a state file) under its own ``state_dir``: a restarted
agent builds a new driver over the same directory and must find the VMs that kept running.

Calls are coroutines that return when the action is done (``start`` returns once the guest
answers); the agent turns their progress into the instance states the cluster sees. Drivers
raise :class:`multiverse.core.errors.MultiverseError` subclasses, never bare exceptions.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from multiverse.core.errors import DriverError
from multiverse.core.model import GuestStats, IncomingEndpoint, LiveProgress, Resources
from multiverse.core.network import Nic
from multiverse.core.sshlogin import SshLogin


class PowerState(enum.StrEnum):
    """What the hypervisor itself says about a VM."""

    RUNNING = "running"
    STOPPED = "stopped"
    MISSING = "missing"  # the hypervisor has no such VM (never created, or deleted)


@dataclass(frozen=True)
class NetworkAttachment:
    """The VM's interface on the cluster network, made ready by the node's network service:
    a tap plugged into the node's bridge, the MAC and address the guest must use, and the
    MTU the overlay leaves. Drivers use it as given; they never build networks."""

    tap: str
    nic: Nic
    mtu: int = 1500

    def guest_config(self) -> str:
        """The guest's ``network`` config (:mod:`multiverse.guest.image` reads it)."""
        nic = self.nic
        return (
            f"address={nic.address}\ngateway={nic.gateway}\ndns={nic.dns}\n"
            f"search={nic.domain}\nmtu={self.mtu}\n"
        )


@dataclass(frozen=True)
class VMConfig:
    """Everything a driver needs to create a VM; stable for the VM's life."""

    id: str  # the instance uuid; drivers name files, sockets and taps after it
    name: str
    cpus: int
    memory: int  # bytes
    disk: int  # bytes
    image: str
    user_data: str = ""
    # On the cluster network (bridge mode); None: the driver's own fallback (QEMU user mode).
    network: NetworkAttachment | None = None


@dataclass(frozen=True)
class VMStatus:
    power: PowerState
    ipv4: str = ""
    message: str = ""  # why, when the driver knows something is wrong


@dataclass(frozen=True)
class ExecChunk:
    """One piece of a running command's output, or its end.

    ``stream`` is 1 (stdout) or 2 (stderr) with ``data``; the last chunk has ``exit_code`` set.
    """

    stream: int = 1
    data: bytes = b""
    exit_code: int | None = None


@dataclass(frozen=True)
class TerminalSize:
    cols: int = 80
    rows: int = 24


@dataclass(frozen=True)
class ImageInfo:
    """An image this host can boot, as ``multiverse images`` lists it."""

    name: str
    kind: str  # "kernel+initrd", "rootfs", or the hypervisor's own kind
    digest: str = ""  # sha256:..., when the image records one
    size: int = 0  # bytes


class Session(Protocol):
    """An interactive process in a VM: a shell or ``exec -t``, usually on a PTY.

    The relay (worker agent -> master -> CLI) moves bytes both ways with ``read``/``write`` and
    forwards resizes. A protocol, not a base class: the guest's SSH shell
    (:class:`multiverse.guest.ssh.GuestShell`) and a local PTY
    (:class:`multiverse.drivers.localpty.LocalSession`) fit it as they are.
    """

    async def read(self) -> bytes:
        """The next output bytes (stdout and stderr merged on a PTY); b"" at the end."""

    async def write(self, data: bytes) -> None:
        """Send input; waits while the other side is not reading (backpressure)."""

    async def close_input(self) -> None:
        """End of input (Ctrl-D on a terminal, EOF on a pipe)."""

    async def resize(self, cols: int, rows: int) -> None: ...

    async def wait(self) -> int:
        """The exit code, once the process has ended."""

    async def close(self) -> None:
        """End the process if still running and release everything."""


class Driver(abc.ABC):
    """One hypervisor on one host."""

    name: str = ""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)

    @abc.abstractmethod
    async def capacity(self) -> Resources:
        """What this host offers to VMs in total."""

    async def validate(self, vm: VMConfig) -> None:  # noqa: B027  # most configs need no check
        """Refuse a config this host cannot run (unknown image, memory below the floor...).

        Called before the agent accepts a launch, so a bad request fails at once and leaves
        nothing behind. Raise InvalidArgument or NotFound.
        """

    @abc.abstractmethod
    async def create(self, vm: VMConfig) -> None:
        """Prepare the VM (disk, files) without booting it. Idempotent."""

    @abc.abstractmethod
    async def start(self, vm: VMConfig) -> VMStatus:
        """Boot the VM and return once the guest answers. Idempotent on a running VM."""

    @abc.abstractmethod
    async def stop(self, vm: VMConfig, force: bool = False) -> None:
        """Shut the VM down (gracefully unless ``force``). Idempotent on a stopped VM."""

    @abc.abstractmethod
    async def delete(self, vm: VMConfig) -> None:
        """Stop the VM if needed and remove everything it owns. Idempotent."""

    @abc.abstractmethod
    async def status(self, vm: VMConfig) -> VMStatus:
        """What the hypervisor says now; cheap enough to call every sync."""

    @abc.abstractmethod
    async def stats(self, vm: VMConfig) -> GuestStats:
        """Load, memory, disk and release from inside the running guest."""

    @abc.abstractmethod
    def exec(
        self, vm: VMConfig, command: Sequence[str], stdin: bytes = b""
    ) -> AsyncIterator[ExecChunk]:
        """Run a command in the guest, streaming its output; the last chunk has the exit code."""

    async def open_session(
        self, vm: VMConfig, command: Sequence[str] | None, size: TerminalSize | None
    ) -> Session:
        """Start ``command`` (None: the login shell) in the guest, on a PTY of ``size`` if given.

        Drivers that cannot offer interactive sessions keep this default.
        """
        raise DriverError(f"the {self.name} driver has no interactive sessions")

    async def ssh_login(self, vm: VMConfig, public_key: str) -> SshLogin:
        """Let ``public_key`` log in to the guest's SSH server for the next
        ``core.sshlogin.LOGIN_WINDOW`` seconds (then it is taken out again), and say where
        that server answers. Drivers whose guests run no SSH server reachable from the node
        keep this default; clients then use :meth:`open_session`.
        """
        raise DriverError(f"the {self.name} driver's guests take no SSH logins")

    # Fault injection (issue 19): hypervisor-level faults; drivers that cannot keep these.

    async def pause(self, vm: VMConfig) -> None:
        """Freeze the VM's CPUs; the guest sees a gap. Counter-action: :meth:`resume`."""
        raise DriverError(f"the {self.name} driver cannot pause VMs")

    async def resume(self, vm: VMConfig) -> None:
        """Let a paused VM run on. Idempotent."""
        raise DriverError(f"the {self.name} driver cannot pause VMs")

    async def reset(self, vm: VMConfig) -> None:
        """Hard reset, as the reset button: no shutdown in the guest."""
        raise DriverError(f"the {self.name} driver cannot reset VMs")

    async def throttle_disk(self, vm: VMConfig, iops: int) -> None:
        """Limit the data disk to ``iops`` operations per second (0: no limit). Idempotent."""
        raise DriverError(f"the {self.name} driver cannot throttle disks")

    async def images(self) -> list[ImageInfo]:
        """The images this host has ready (listed, not downloaded)."""
        return []

    async def logs(self, vm: VMConfig) -> str:
        """The VM's console log, if the hypervisor keeps one."""
        return ""

    async def close(self) -> None:  # noqa: B027  # optional: most drivers hold nothing open
        """Release connections; VMs keep running."""


@runtime_checkable
class Migratable(Protocol):
    """A driver whose stopped VMs can move to another host as files (a cold move).

    The agent streams :meth:`export_files` to the target agent, which writes them under
    :meth:`incoming_dir` and then calls :meth:`adopt_incoming`; until then the target's driver
    does not know the VM. Opt-in, as Nova's capabilities are: a driver without it is refused.
    """

    def export_files(self, vm: VMConfig) -> dict[str, Path]:
        """Name (relative, may contain ``/``) -> path of everything a stopped VM keeps: its
        disk, its config, its SSH host key. Never runtime files (pid, sockets)."""
        ...

    def incoming_dir(self, vm: VMConfig) -> Path:
        """Where an import writes the files; invisible to :meth:`Driver.status` until adopted."""
        ...

    async def adopt_incoming(self, vm: VMConfig) -> None:
        """Make the imported files the (stopped) VM. Idempotent; the counter-action is
        :meth:`Driver.delete`."""
        ...

    async def abort_incoming(self, vm: VMConfig) -> None:
        """Remove what an unfinished import wrote (the counter-action of the transfer)."""
        ...


@runtime_checkable
class LiveMigratable(Protocol):
    """A driver whose running VMs can move to another host without stopping (a live move).

    The target prepares an incoming VM (:meth:`prepare_incoming`; counter-action
    :meth:`Driver.delete`), the source mirrors its disk into it and sends its memory and
    device state (:meth:`migrate_out`; counter-action :meth:`abort_migrate_out`, which leaves
    the VM running on the source), and the target lets the VM run on (:meth:`finish_incoming`).
    Until that last call the source's VM is the truth; after it, the target's.
    """

    async def prepare_incoming(self, vm: VMConfig, host: str, tls_dir: Path) -> IncomingEndpoint:
        """Start the VM on this host waiting for its state, on ``host``; a VM prepared before
        is replaced (so a retried move starts clean). ``tls_dir`` holds QEMU's x509 files."""
        ...

    async def migrate_out(
        self, vm: VMConfig, to: IncomingEndpoint, tls_dir: Path,
        progress: Callable[[LiveProgress], None],
    ) -> LiveProgress:  # fmt: skip
        """Send the running VM to ``to``; returns once the target holds it, paused (the VM
        here is paused too). The target's ``login_key`` is let into the guest first. Any
        failure or cancellation leaves the VM running here."""
        ...

    async def abort_migrate_out(self, vm: VMConfig) -> None:
        """Cancel whatever migration of the VM is under way and let it run here. Idempotent."""
        ...

    async def finish_incoming(self, vm: VMConfig, host_key: str) -> VMStatus:
        """Let the received VM run here (once its state arrived whole); ``host_key`` is the
        guest's SSH host key as the source knew it. Idempotent on a VM already running."""
        ...


def host_resources(path: Path) -> Resources:
    """This host's cpus, memory, and the disk of the filesystem holding ``path``."""
    import psutil  # imported here: drivers that never ask stay cheap to import

    return Resources(
        cpus=psutil.cpu_count() or 1,
        memory=psutil.virtual_memory().total,
        disk=psutil.disk_usage(str(path)).total,
    )
