"""The commands that run a master or a worker on this machine (``master``, ``worker``, ``up``,
``down``) and build guest images here (``image build``).

Kept apart from ``client/`` because the client speaks only HTTP, while these start the servers
themselves. Server modules are imported inside the commands: loading this module, as
``multiverse master --help`` does, starts nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from multiverse.client import cmdline
from multiverse.client.cli import (
    format_option,
    labels_option,
    parsed,
    seconds_option,
)
from multiverse.client.errors import EXIT_FAILED
from multiverse.core.errors import MultiverseError
from multiverse.core.sizes import parse_size

if TYPE_CHECKING:
    from multiverse.core.model import Resources

# What only the servers need (asyncio, logging, subprocess, the client's config) is imported in
# the commands that start them: `multiverse master --help` loads this module, and starts nothing.


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "multiverse"


def _logging() -> None:
    import logging

    logging.Formatter.converter = time.gmtime
    logging.basicConfig(
        level=os.environ.get("MULTIVERSE_LOG_LEVEL", "INFO"),
        format="%(asctime)sZ %(levelname)s %(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


# Young-generation size of the collector for the long-running processes (Python's is 700).
GC_YOUNG = 50_000


def _collect_less() -> None:
    """Keep the cycle collector off the long-lived heap of a master or worker.

    With Python's thresholds a master of 1,000 nodes ran a full collection every few seconds,
    each 100-200 ms with the event loop stopped (a page of ``GET /instances`` then took 200 ms
    instead of 20): node views, reports and gRPC calls promote short-lived objects into the
    oldest generation faster than its 25% rule holds it back. What start-up made is frozen out
    of every collection, and the young generation is larger, so fewer objects get old; reference
    counting frees all but cycles, which are still collected, less often."""
    import gc

    gc.freeze()
    gc.set_threshold(GC_YOUNG, 20, 100)


def _serve(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly. VMs are left running."""
    import asyncio
    import signal

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await start()
            _collect_less()
            await stopping.wait()
        finally:
            await stop()

    try:
        asyncio.run(main())
    except MultiverseError as exc:
        cmdline.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_FAILED)


def _default_node_name() -> str:
    import re
    import socket

    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()).strip("-") or "node"
    return name if name[0].isalpha() else f"node-{name}"


def _resources(text: str) -> Resources:
    from multiverse.core.model import Resources  # the model's import only where it parses

    return Resources.parse(text)


_capacity = parsed(_resources)


def _allowed_driver(name: str) -> str:
    """Checked while parsing, so that ``up --detach`` refuses before it detaches."""
    if name == "fake":
        from multiverse.drivers.fake import require_allowed

        require_allowed()
    return name


data_dir_option = cmdline.option(
    "--data-dir",
    type=cmdline.Path(file_okay=False),
    default=default_data_dir,
    show_default="~/.local/share/multiverse",
    help="Where state is kept.",
)
sync_option = cmdline.option(
    "--sync-interval",
    type=cmdline.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="Seconds between worker reports when nothing changes.",
)


def _certificate_lifetime(seconds: int | None) -> timedelta:
    from multiverse.wire.pki import check_lifetime

    try:
        return check_lifetime(timedelta(seconds=seconds or 0))
    except MultiverseError as exc:
        raise cmdline.BadParameter(exc.message) from exc


@cmdline.command()
@cmdline.option("--listen", default="0.0.0.0:1337", show_default=True, help="Cluster gRPC address.")
@cmdline.option("--advertise", default="", help="Host workers reach the master at (join tokens).")
@cmdline.option(
    "--max-auth-failures",
    type=cmdline.IntRange(1),
    default=20,
    show_default=True,
    help="Failed API authentications a client may make per minute before it is refused.",
)
@cmdline.option(
    "--insecure-http",
    is_flag=True,
    help="Serve the API over plain HTTP (loopback only: tokens would cross the network in clear).",
)
@cmdline.option("--api-listen", default="0.0.0.0:1338", show_default=True, help="REST API address.")
@cmdline.option(
    "--image-rate-limit",
    callback=parsed(parse_size),
    default="0",
    help="Bytes per second each image transfer to a worker may take, e.g. 100M (0: no limit).",
)
@data_dir_option
@cmdline.option(
    "--db", default="", help="SQLAlchemy database URL (default: SQLite in the data dir)."
)
@cmdline.option(
    "--node-timeout",
    type=cmdline.FloatRange(0.5),
    default=20.0,
    show_default=True,
    help="Seconds without a report before a node is NotReady.",
)
@cmdline.option(
    "--down-timeout",
    type=cmdline.FloatRange(1),
    default=120.0,
    show_default=True,
    help="Seconds without a report before a node is Down (its instances then Unknown).",
)
@cmdline.option(
    "--node-cert-ttl",
    callback=lambda ctx, param, value: _certificate_lifetime(seconds_option(ctx, param, value)),
    default="365d",
    show_default=True,
    help="Lifetime of the certificates signed for nodes; they renew at a third left.",
)
@cmdline.option(
    "--network",
    "network_cidr",
    default="",
    help="The cluster network's CIDR, fixed at the first start "
    "(default: 10.77.0.0/16 or another that no route of this host overlaps).",
)
@cmdline.option(
    "--nat/--no-nat",
    default=None,
    help="Masquerade the VMs' outbound traffic on their nodes (default: on).",
)
@cmdline.option(
    "--wheelhouse",
    type=cmdline.Path(file_okay=False),
    envvar="MULTIVERSE_WHEELHOUSE",
    help="Where `node add` caches the wheels it copies to hosts (default: <data-dir>/wheelhouse).",
)
@cmdline.option(
    "--install-service",
    is_flag=True,
    help="Write a systemd unit that runs this master with these options, enable and start it "
    "(where systemd runs), and exit.",
)
def master(
    network_cidr: str,
    nat: bool | None,
    listen: str,
    advertise: str,
    max_auth_failures: int,
    insecure_http: bool,
    api_listen: str,
    image_rate_limit: int,
    data_dir: Path,
    db: str,
    node_timeout: float,
    down_timeout: float,
    node_cert_ttl: timedelta,
    wheelhouse: Path | None,
    install_service: bool,
) -> None:
    """Run the master: cluster state, REST API, scheduler, image store."""
    if install_service:
        _install_master_service()
        return
    from multiverse.client.config import user_config_path
    from multiverse.master.server import Master, MasterConfig

    _logging()
    server = Master(
        MasterConfig(
            data_dir=data_dir,
            listen=listen,
            advertise=advertise,
            insecure_http=insecure_http,
            max_auth_failures=max_auth_failures,
            api_listen=api_listen,
            db=db,
            node_timeout=node_timeout,
            down_timeout=max(down_timeout, node_timeout),
            user_config=user_config_path(),
            image_dirs=[data_dir / "images", *_image_dirs()],
            image_rate_limit=float(image_rate_limit),
            network=network_cidr,
            nat=nat,
            node_cert_lifetime=node_cert_ttl,
            wheelhouse=wheelhouse,
        )
    )

    async def start() -> None:
        await server.start()
        cmdline.echo(f"master addr: {listen} / api server addr: {api_listen}, data in {data_dir}")
        cmdline.echo(
            f"client config: {data_dir / 'client.toml'}; "
            "join workers with a token from `multiverse token create`",
            err=True,
        )

    _serve(start, server.stop)


def _install_master_service() -> None:
    """`master --install-service`: the unit runs this very Python with the same options."""
    import subprocess

    from multiverse.core.files import write_private
    from multiverse.master.provision import master_unit

    args = [a for a in sys.argv[sys.argv.index("master") + 1 :] if a != "--install-service"]
    unit_dir = Path(os.environ.get("MULTIVERSE_SYSTEMD_DIR", "/etc/systemd/system"))
    path = unit_dir / "multiverse-master.service"
    # 0644 as units are; it names no secret (the master's own files hold those).
    write_private(path, master_unit(args).encode(), 0o644)
    if not Path("/run/systemd/system").is_dir():
        cmdline.echo(f"wrote {path}; systemd does not run here: start `multiverse master` yourself")
        return
    for command in (["daemon-reload"], ["enable", "--now", "multiverse-master.service"]):
        subprocess.run(["systemctl", *command], check=True)
    cmdline.echo(f"wrote {path}; multiverse-master.service is enabled and started")


def _image_dirs() -> list[Path]:
    """Extra places to find images: MULTIVERSE_IMAGE_CACHE (a shared cache, as tests use)."""
    cache = os.environ.get("MULTIVERSE_IMAGE_CACHE")
    return [Path(cache)] if cache else []


def _build_test_image(images_dir: Path) -> Path:
    """Build the tiny guest (once; cached) with a spinner saying what it is doing."""
    from rich.console import Console

    from multiverse.guest.image import build_test_image

    console = Console(stderr=True)
    with console.status("building the test guest image") as status:
        return build_test_image(images_dir, lambda step: status.update(f"test image: {step}"))


def _worker_options(func: Callable[..., None]) -> Callable[..., None]:
    options = [
        cmdline.option(
            "--driver",
            type=cmdline.Choice(["qemu", "firecracker", "multipass", "fake"]),
            callback=parsed(_allowed_driver),
            default="qemu",
            show_default=True,
            help="The hypervisor this host runs.",
        ),
        cmdline.option(
            "--capacity",
            callback=_capacity,
            help="What VMs may use, e.g. cpus=8,memory=16G,disk=100G (default: host).",
        ),
        cmdline.option(
            "--fake-delay",
            type=cmdline.FloatRange(0),
            default=0.0,
            help="Seconds each fake VM action takes.",
        ),
        cmdline.option(
            "--network-mode",
            type=cmdline.Choice(["auto", "bridge", "user"]),
            envvar="MULTIVERSE_NETWORK_MODE",
            default="auto",
            show_default=True,
            help="bridge: VMs on the cluster network (needs CAP_NET_ADMIN); user: QEMU's NAT; "
            "auto: bridge when this process may build networks.",
        ),
        sync_option,
        cmdline.option(
            "--image-cache",
            callback=parsed(parse_size),
            default="20G",
            show_default=True,
            help="How much the node's image cache may hold; least recently used images go.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cmdline.command()
@cmdline.option("--master", "master_address", required=True, help="The master's HOST:PORT (1337).")
@cmdline.option(
    "--token",
    envvar="MULTIVERSE_JOIN_TOKEN",
    default="",
    help="Join token (not needed to re-join). Prefer the MULTIVERSE_JOIN_TOKEN variable or "
    "--token-file: an argument is visible to every user in `ps`.",
)
@cmdline.option(
    "--token-file",
    type=cmdline.Path(exists=True, dir_okay=False),
    help="Read the join token from this file.",
)
@cmdline.option("--listen", default="0.0.0.0:1339", show_default=True, help="Agent gRPC address.")
@cmdline.option("--advertise", default="", help="HOST:PORT the master dials (default: as seen).")
@cmdline.option(
    "--session-listen",
    default="",
    help="HOST:PORT of the agent's shell endpoint, which CLIs reach straight (default: the "
    "--listen host, a free port; 'off': shells go through the master).",
)
@cmdline.option(
    "--data-dir",
    type=cmdline.Path(file_okay=False),
    default=lambda: default_data_dir() / "worker",
    show_default="~/.local/share/multiverse/worker",
)
@cmdline.option("--name", default=_default_node_name, help="Node name (default: the host name).")
@cmdline.option("--labels", callback=labels_option, default="", help="Node labels: k=v,...")
@cmdline.option(
    "--simulate",
    type=cmdline.IntRange(1),
    default=None,
    help="Run N hollow nodes over the fake driver instead (scale tests): NAME-0, NAME-1... "
    "in DATA_DIR, agents on the --listen port plus their number (0: free ports); the join "
    "token needs N uses.",
)
@_worker_options
def worker(
    master_address: str,
    token: str,
    token_file: Path | None,
    listen: str,
    advertise: str,
    session_listen: str,
    data_dir: Path,
    name: str,
    labels: dict[str, str],
    driver: str,
    capacity: Resources | None,
    fake_delay: float,
    network_mode: str,
    sync_interval: float,
    simulate: int | None,
    image_cache: int,
) -> None:
    """Run a worker: join a master and run its VMs on this host."""
    from multiverse.worker.server import Worker, WorkerConfig, Workers, simulated

    if token_file is not None:
        token = token_file.read_text().strip()
    if simulate and driver != "fake" and not cmdline.current_context().is_default("driver"):
        raise cmdline.BadParameter("simulated nodes run the fake driver", param_hint="--driver")
    _logging()
    config = WorkerConfig(
        master=master_address,
        data_dir=data_dir,
        token=token,
        listen=listen,
        advertise=advertise,
        session_listen=session_listen,
        name=name,
        driver="fake" if simulate else driver,
        labels=labels,
        capacity=capacity,
        sync_interval=sync_interval,
        fake_delay=fake_delay,
        image_dirs=_image_dirs(),
        image_cache=image_cache,
        network_mode=network_mode,
    )
    if simulate:
        try:
            many = Workers(simulated(config, simulate))
        except MultiverseError as exc:
            raise cmdline.UsageError(exc.message) from exc

        async def start_many() -> None:
            identities = await many.start()
            cmdline.echo(f"joined {len(identities)} simulated nodes as {config.name}-*")

        _serve(start_many, many.stop)
        return
    server = Worker(config)

    async def start() -> None:
        identity = await server.start()
        cmdline.echo(f"joined as {identity.name} with uuid {identity.node_id}")

    _serve(start, server.stop)


@cmdline.command()
@data_dir_option
@cmdline.option("--listen", default="127.0.0.1:1337", show_default=True)
@cmdline.option("--api-listen", default="127.0.0.1:1338", show_default=True)
@cmdline.option("--agent-listen", default="127.0.0.1:1339", show_default=True)
@cmdline.option("--detach", is_flag=True, help="Run in the background; `multiverse down` stops it.")
@_worker_options
def up(
    data_dir: Path,
    listen: str,
    api_listen: str,
    agent_listen: str,
    detach: bool,
    driver: str,
    capacity: Resources | None,
    fake_delay: float,
    network_mode: str,
    sync_interval: float,
    image_cache: int,
) -> None:
    """Run a master and a worker for this machine in one process."""
    if cmdline.current_context().is_default("network_mode"):
        # One host needs no overlay, and a quick start should not build a bridge and
        # firewall rules on a machine unasked: user mode unless --network-mode says otherwise.
        network_mode = "user"
    images_dir = data_dir / "images"
    if driver == "qemu":  # before detaching, so that the user sees the build's progress
        _build_test_image(Path(os.environ.get("MULTIVERSE_IMAGE_CACHE") or images_dir))
    if detach:
        _detach(data_dir)
        return
    from multiverse.client.config import user_config_path
    from multiverse.master.server import Master, MasterConfig
    from multiverse.worker.server import Worker, WorkerConfig

    _logging()
    master_server = Master(
        MasterConfig(
            data_dir=data_dir,
            listen=listen,
            api_listen=api_listen,
            user_config=user_config_path(),
            image_dirs=[images_dir, *_image_dirs()],
        )
    )
    worker_dir = data_dir / "worker"
    worker_server: Worker | None = None

    async def start() -> None:
        nonlocal worker_server
        await master_server.start()
        token = ""
        if not (worker_dir / "node.json").exists():
            token = (await master_server.join_token(None, 1, "all-in-one worker"))[1]
        worker_server = Worker(
            WorkerConfig(
                master=f"127.0.0.1:{master_server.grpc_port}",
                data_dir=worker_dir,
                token=token,
                listen=agent_listen,
                name=_default_node_name(),
                driver=driver,
                capacity=capacity,
                sync_interval=sync_interval,
                fake_delay=fake_delay,
                image_dirs=[images_dir, *_image_dirs()],
                image_cache=image_cache,
                network_mode=network_mode,
            )
        )
        identity = await worker_server.start()
        (data_dir / "up.pid").write_text(str(os.getpid()))
        cmdline.echo(
            f"multiverse is up: api {master_server.api_url}, "
            f"node {identity.name} ({driver}), data in {data_dir}"
        )

    async def stop() -> None:
        if worker_server:
            await worker_server.stop()
        await master_server.stop()
        (data_dir / "up.pid").unlink(missing_ok=True)

    _serve(start, stop)


def _detach(data_dir: Path) -> None:
    """Start ``multiverse up`` in the background and return once its API answers."""
    import subprocess

    import httpx

    from multiverse.client.config import ClientConfig

    data_dir.mkdir(parents=True, exist_ok=True)
    pid_file = data_dir / "up.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        cmdline.echo(f"multiverse is already up (pid {pid_file.read_text()})")
        return
    args = [a for a in sys.argv[1:] if a != "--detach"]
    log = open(data_dir / "multiverse.log", "ab")  # noqa: SIM115  # handed to the child
    process = subprocess.Popen(
        [sys.executable, "-m", "multiverse", *args],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    config = data_dir / "client.toml"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise cmdline.CommandError(f"multiverse up exited; see {data_dir / 'multiverse.log'}")
        if pid_file.exists() and config.exists():
            client = ClientConfig.from_file(config)
            try:
                health = f"{client.server}/api/v1/health"
                httpx.get(health, timeout=2, verify=client.ssl_context()).raise_for_status()
                cmdline.echo(
                    f"multiverse is up (pid {process.pid}); log: {data_dir / 'multiverse.log'}"
                )
                return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise cmdline.CommandError(f"multiverse up did not come up; see {data_dir / 'multiverse.log'}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@cmdline.command()
@data_dir_option
def down(data_dir: Path) -> None:
    """Stop a `multiverse up --detach` (its VMs keep running)."""
    import signal

    pid_file = data_dir / "up.pid"
    if not pid_file.exists() or not _alive(pid := int(pid_file.read_text())):
        cmdline.echo("multiverse is not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    cmdline.echo("multiverse is down")


@cmdline.group(name="build")
def image_build() -> None:
    """Build a guest image on this host and import it into the master's store."""


def _build_and_import(
    name: str, build: Callable[[Path], Path], images_dir: Path, import_it: bool, fmt: str = "table"
) -> None:
    """Build guest image ``name`` (cached), then send it to the configured master's store."""
    import json

    from multiverse.core.images import ImageManifest

    built = build(images_dir)
    digest = ImageManifest.from_json(json.loads((built / "image.json").read_text())).digest
    result: dict[str, object] = {"name": name, "path": str(built), "digest": digest}
    if import_it:
        from multiverse.client.cli import api_client
        from multiverse.client.images import upload_files, wait_with_progress

        client = api_client()
        if not any(item["digest"] == digest for item in client.stored_images()):
            files = {path.name: path for path in sorted(built.iterdir()) if path.is_file()}
            body = {"name": name, "files": upload_files(client, files)}
            wait_with_progress(client, client.import_image(body), 3600)
        result["imported"] = True
    if fmt == "json":
        cmdline.echo(json.dumps(result, indent=2))
    else:
        where = "; in the master's store" if import_it else ""
        cmdline.echo(f"image {name} {digest[:19]} built in {built}{where}")


def _build_debian_image(images_dir: Path) -> Path:
    """Build the Debian guest (once; cached), its steps printed and debootstrap's in a status
    line."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from multiverse.guest.debian import build_debian_image

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("debian image: checking the cache")

        def step(message: str) -> None:
            # debootstrap's own lines scroll by in the status line; our steps stay printed.
            if not message.startswith("debootstrap: "):
                progress.console.print(f"debian image: {message}")
            progress.update(task, description=f"debian image: {message}")

        return build_debian_image(images_dir, step)


images_dir_option = cmdline.option(
    "--images-dir",
    type=cmdline.Path(file_okay=False),
    help="Where to build (default: <data-dir>/images).",
)


import_option = cmdline.option(
    "--import/--no-import",
    "import_it",
    default=True,
    show_default=True,
    help="Import the result into the configured master's store.",
)


@image_build.command(name="debian")
@data_dir_option
@images_dir_option
@import_option
@format_option
def image_build_debian(data_dir: Path, images_dir: Path | None, import_it: bool, fmt: str) -> None:
    """Debian 12 (systemd, OpenSSH, cloud-init) with debootstrap; cached, its slow debootstrap
    step cached apart. Needs root."""
    _build_and_import(
        "debian", _build_debian_image, images_dir or data_dir / "images", import_it, fmt
    )


@image_build.command(name="tiny")
@data_dir_option
@images_dir_option
@import_option
@format_option
def image_build_tiny(data_dir: Path, images_dir: Path | None, import_it: bool, fmt: str) -> None:
    """The tiny test guest from Debian packages (kernel, busybox, dropbear); a no-op once built."""
    _build_and_import("tiny", _build_test_image, images_dir or data_dir / "images", import_it, fmt)


@cmdline.command(name="build-test", hidden=True)
@data_dir_option
@images_dir_option
def image_build_test(data_dir: Path, images_dir: Path | None) -> None:
    """The old name of `image build tiny --no-import`."""
    _build_and_import("tiny", _build_test_image, images_dir or data_dir / "images", False)
