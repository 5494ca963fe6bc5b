"""The Firecracker driver against the stand-in (tests/standins/firecracker), on the node's
network service (worker/network.py) and refused without it, and the OCI-to-ext4 import.

No Firecracker binary and no hardware KVM here: the API tests run the stand-in without booting
anything (``FIRECRACKER_STANDIN_BOOT=none``); the tests that touch the network run the driver
inside a network namespace they create (tests/firecracker_scenario.py under ``ip netns exec``),
so no bridge, tap or address ever appears on the host; the ``vm`` test boots the tiny guest.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from harness import Cluster, wait_until

from multiverse.core.errors import Conflict, DriverError, InvalidArgument, NotFound, Unavailable
from multiverse.core.sizes import MiB
from multiverse.drivers.base import PowerState, VMConfig
from multiverse.drivers.firecracker import (
    BINARY_ENV,
    FirecrackerAPI,
    FirecrackerDriver,
    api_error,
)
from multiverse.drivers.rootfs import import_oci
from multiverse.worker.server import Worker, WorkerConfig

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standins" / "firecracker"
SCENARIO = REPO / "tests" / "firecracker_scenario.py"
T = TypeVar("T")


def run(step: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await step()

    return asyncio.run(main())


def new_vm(image: str = "tiny", memory: int = 256 * MiB) -> VMConfig:
    return VMConfig(
        id=str(uuid.uuid4()), name="fc-1", cpus=1, memory=memory, disk=64 * MiB, image=image
    )


# --- the stand-in's API, through the driver's client -----------------------------------------


@pytest.fixture()
def standin(tmp_path: Path) -> Iterator[FirecrackerAPI]:
    """A stand-in Firecracker that serves the API and boots nothing."""
    socket_path = tmp_path / "fc.sock"
    process = subprocess.Popen(
        [str(STANDIN), "--api-sock", str(socket_path), "--id", "test-vm"],
        env={**os.environ, "FIRECRACKER_STANDIN_BOOT": "none"},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: socket_path.exists() or process.poll() is not None, 10, 0.02)
        assert process.poll() is None, "stand-in did not start"
        api = FirecrackerAPI(socket_path, "test-vm")
        api.process = process  # type: ignore[attr-defined]
        yield api
    finally:
        process.kill()
        process.wait()


def test_api_follows_the_swagger(standin: FirecrackerAPI, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"")

    async def scenario() -> None:
        info = await standin.get("/")
        version = info.pop("vmm_version")
        # A release with --enable-pci (1.13+), told the same by both routes.
        assert re.fullmatch(r"1\.(1[3-9]|[2-9][0-9])\.[0-9]+(-standin)?", version), version
        assert await standin.get("/version") == {"firecracker_version": version}
        assert info == {"id": "test-vm", "state": "Not started", "app_name": "Firecracker"}
        # Bad bodies: a 400 whose fault_message reaches the caller in a DriverError.
        for path, body, words in (
            ("/machine-config", {"vcpu_count": 1}, "missing field `mem_size_mib`"),
            ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "x": 1}, "unknown field"),
            ("/machine-config", {"vcpu_count": True, "mem_size_mib": 128}, "invalid type"),
            ("/machine-config", {"vcpu_count": 64, "mem_size_mib": 128}, "between 1 and 32"),
            ("/boot-source", {"boot_args": "quiet"}, "missing field `kernel_image_path`"),
            ("/boot-source", {"kernel_image_path": "/nonexistent"}, "kernel file"),
            ("/drives/rootfs", {"drive_id": "other", "is_root_device": True}, "does not match"),
            ("/network-interfaces/eth0", {"iface_id": "eth0"}, "missing field `host_dev_name`"),
            (
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"},
                "Invalid MAC",
            ),
            ("/entropy", {"rate": 1}, "unknown field `rate`"),
            ("/actions", {"action_type": "Explode"}, "unknown variant"),
            ("/actions", {"action_type": "InstanceStart"}, "without kernel configuration"),
            ("/actions", {"action_type": "SendCtrlAltDel"}, "before starting"),
        ):
            with pytest.raises(DriverError, match="refused PUT") as caught:
                await standin.put(path, body)
            assert words in caught.value.message and "(400)" in caught.value.message

        await standin.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
        assert await standin.get("/machine-config") == {"vcpu_count": 2, "mem_size_mib": 256}
        await standin.put(
            "/boot-source", {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"}
        )
        await standin.put(
            "/drives/rootfs",
            {
                "drive_id": "rootfs",
                "path_on_host": str(disk),
                "is_root_device": True,
                "is_read_only": False,
            },
        )
        await standin.put(
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"},
        )
        await standin.put("/entropy", {})
        await standin.put("/actions", {"action_type": "InstanceStart"})
        assert (await standin.get("/"))["state"] == "Running"
        with pytest.raises(Conflict, match="after starting"):
            await standin.put("/entropy", {})

        # Pre-boot configuration, and a second start, are refused once started: Conflict.
        with pytest.raises(Conflict, match="after starting"):
            await standin.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        with pytest.raises(Conflict, match="after starting"):
            await standin.put("/actions", {"action_type": "InstanceStart"})

        await standin.put("/actions", {"action_type": "SendCtrlAltDel"})
        process: subprocess.Popen[bytes] = standin.process  # type: ignore[attr-defined]
        await asyncio.to_thread(process.wait, 10)  # it exits when the guest powers off
        with pytest.raises(Unavailable, match="did not answer"):
            await standin.get("/")

    run(scenario)


def test_api_error_shapes() -> None:
    refused = api_error("PUT", "/drives/x", 400, '{"fault_message": "bad drive"}', "vm")
    assert type(refused) is DriverError and refused.message.endswith("(400): bad drive")
    assert isinstance(
        api_error("PUT", "/x", 400, '{"fault_message": "' + "after starting" + '"}'), Conflict
    )
    assert "(no fault message)" in api_error("GET", "/", 500, "").message
    assert "<html>" in api_error("GET", "/", 502, "<html>").message
    assert "[1]" in api_error("GET", "/", 500, "[1]").message


def test_standin_refuses_a_socket_in_use(tmp_path: Path) -> None:
    socket_path = tmp_path / "busy.sock"
    socket_path.write_text("")
    result = subprocess.run(
        [str(STANDIN), "--api-sock", str(socket_path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and "Failed to open the API socket" in result.stderr


# --- no second network: without the node's, Firecracker refuses --------------------------------


def test_a_firecracker_worker_without_the_cluster_network_refuses_to_start(
    tmp_path: Path,
) -> None:
    """User mode (no CAP_NET_ADMIN, or asked): Firecracker has no NAT of its own, so the worker
    says what to do before joining anything (the master address is never called)."""
    worker = Worker(
        WorkerConfig(
            master="127.0.0.1:9", data_dir=tmp_path / "w", driver="firecracker",
            network_mode="user",
        )
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"need the cluster network.*--network-mode bridge"):
        run(worker.start)
    run(worker.stop)
    assert not (tmp_path / "w" / "node.json").exists()  # it did not join


# --- the driver without a network ------------------------------------------------------------


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """Two fake images: kernel+initrd, and kernel+rootfs (no VM boots from them here)."""
    root = tmp_path / "images"
    for name, files in (("tiny", ("vmlinux", "initrd.img")), ("oci", ("vmlinux", "rootfs.ext4"))):
        (root / name).mkdir(parents=True)
        for file in files:
            (root / name / file).write_bytes(b"")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(root / "oci" / "rootfs.ext4"), "20M"],
        check=True,
        capture_output=True,
    )
    return root


def test_driver_validates_and_creates_disks(tmp_path: Path, images: Path) -> None:
    driver = FirecrackerDriver(tmp_path / "state", [images], binary=str(STANDIN))

    async def scenario() -> None:
        with pytest.raises(NotFound, match="image 'nope' not found"):
            await driver.validate(new_vm("nope"))
        with pytest.raises(InvalidArgument, match="too small"):
            await driver.validate(new_vm(memory=32 * MiB))
        with pytest.raises(InvalidArgument):
            await driver.create(new_vm("../etc"))
        assert list(driver.vms_dir.iterdir()) == []

        tiny, oci = new_vm("tiny"), new_vm("oci")
        for vm in (tiny, oci):
            assert (await driver.status(vm)).power == PowerState.MISSING
            await driver.create(vm)
            await driver.create(vm)  # idempotent
            assert (await driver.status(vm)).power == PowerState.STOPPED
        # No tap from the node's network service: refused, nothing started, no network made.
        with pytest.raises(InvalidArgument, match="need the cluster network"):
            await driver.start(tiny)
        assert (await driver.status(tiny)).power == PowerState.STOPPED
        assert processes_under(tmp_path / "state") == []
        # The tiny image has no rootfs: an empty ext4 data disk of the VM's size.
        tiny_disk = driver.vms_dir / tiny.id / "rootfs.ext4"
        assert tiny_disk.stat().st_size == 64 * MiB
        # An image with a rootfs: the VM's copy, grown to the VM's disk size.
        oci_disk = driver.vms_dir / oci.id / "rootfs.ext4"
        assert oci_disk.stat().st_size == 64 * MiB
        check = subprocess.run(["e2fsck", "-fn", str(oci_disk)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with pytest.raises(Conflict, match="not running"):
            await driver.stats(tiny)
        with pytest.raises(Conflict):
            [chunk async for chunk in driver.exec(tiny, ["true"])]
        for vm in (tiny, oci):
            await driver.delete(vm)
            await driver.delete(vm)
            assert (await driver.status(vm)).power == PowerState.MISSING
        assert list(driver.vms_dir.iterdir()) == []
        with pytest.raises(NotFound):
            await driver.stop(tiny)

    run(scenario)


def test_binary_and_run_dir_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BINARY_ENV, "/opt/fc/firecracker")
    assert FirecrackerDriver(tmp_path / "a", []).binary == "/opt/fc/firecracker"
    assert FirecrackerDriver(tmp_path / "a", [], binary="/x").binary == "/x"
    deep = tmp_path / ("d" * 80) / "state"
    driver = FirecrackerDriver(deep, [])
    assert len(str(driver.run_dir / f"{uuid.uuid4()}.sock")) <= 107
    assert driver.run_dir == FirecrackerDriver(deep, []).run_dir  # stable: adoption finds it


# --- OCI image layouts -----------------------------------------------------------------------


def _layer(entries: dict[str, bytes | str | None], compress: bool) -> tuple[bytes, str]:
    """A layer tarball: bytes are files, "DIR" a directory, "->T" a symlink to T, "=>T" a hard
    link to T, "CHR"/"BLK" a device node, None a whiteout marker file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            if content == "DIR":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                archive.addfile(info)
            elif isinstance(content, str) and content.startswith("=>"):
                info.type, info.linkname = tarfile.LNKTYPE, content[2:]
                archive.addfile(info)
            elif content in ("CHR", "BLK"):
                info.type = tarfile.CHRTYPE if content == "CHR" else tarfile.BLKTYPE
                info.mode, info.devmajor, info.devminor = 0o666, 1, 3
                archive.addfile(info)
            else:
                data = content if isinstance(content, bytes) else b""
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    if compress:
        return gzip.compress(data), "application/vnd.oci.image.layer.v1.tar+gzip"
    return data, "application/vnd.oci.image.layer.v1.tar"


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def write_oci_layout(layout: Path, layers: list[tuple[bytes, str]]) -> None:
    config = _write_blob(layout, b'{"architecture": "amd64", "os": "linux"}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config},
        "layers": [
            {"mediaType": media_type, "digest": _write_blob(layout, data), "size": len(data)}
            for data, media_type in layers
        ],
    }
    manifest_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _write_blob(layout, manifest_bytes),
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def debugfs(image: Path, request: str) -> str:
    result = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return result.stdout


def test_import_oci_applies_layers_in_order_with_whiteouts(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(
        layout,
        [
            _layer(
                {
                    "etc": "DIR",
                    "etc/os-release": b"ID=base\n",
                    "etc/motd": b"hello\n",
                    "var/cache": "DIR",
                    "var/cache/a": b"a",
                    "var/cache/b": b"b",
                    "bin/tool": b"v1",
                    "bin/sh": "->busybox",
                },
                compress=True,
            ),
            _layer(
                {
                    "etc/os-release": b"ID=top\n",  # a later layer wins
                    "etc/.wh.motd": None,  # deletes etc/motd
                    "var/cache/.wh..wh..opq": None,  # empties var/cache of the lower layers
                    "var/cache/c": b"c",  # ...but keeps this layer's own
                },
                compress=False,
            ),
            _layer({"bin/tool": b"v3", "./srv/data": b"x"}, compress=True),
        ],
    )
    image = tmp_path / "rootfs.ext4"
    import_oci(layout, image, 32 * MiB)
    assert image.stat().st_size == 32 * MiB
    assert debugfs(image, "cat /etc/os-release") == "ID=top\n"
    assert debugfs(image, "cat /bin/tool") == "v3"
    assert debugfs(image, "cat /srv/data") == "x"
    assert (
        "File not found"
        in subprocess.run(
            ["debugfs", "-R", "stat /etc/motd", str(image)], capture_output=True, text=True
        ).stderr
    )
    listing = debugfs(image, "ls /var/cache")
    assert " c " in f" {listing} " and " a " not in f" {listing} " and " b " not in f" {listing} "
    assert "busybox" in debugfs(image, "stat /bin/sh")  # the symlink kept its target
    assert ".wh." not in debugfs(image, "ls /etc") + listing


def test_import_oci_refuses_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not an OCI image layout"):
        import_oci(tmp_path, tmp_path / "x.ext4", 16 * MiB)
    evil = tmp_path / "evil"
    write_oci_layout(evil, [_layer({"../outside": b"x"}, compress=False)])
    with pytest.raises(InvalidArgument, match="leaves the root"):
        import_oci(evil, tmp_path / "evil.ext4", 16 * MiB)
    corrupt = tmp_path / "corrupt"
    write_oci_layout(corrupt, [_layer({"a": b"a"}, compress=True)])
    manifest_blobs = sorted(
        (corrupt / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size
    )
    for blob in manifest_blobs:
        if blob.read_bytes()[:2] == b"\x1f\x8b":
            blob.write_bytes(gzip.compress(b"tampered"))
    with pytest.raises(InvalidArgument, match="corrupt"):
        import_oci(corrupt, tmp_path / "corrupt.ext4", 16 * MiB)
    assert not list(tmp_path.glob("*.ext4"))


def _tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory`` with its content and link count."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_nlink)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _in_image(image: Path, path: str) -> bool:
    found = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True)
    return b"File not found" not in found.stderr


@pytest.mark.parametrize(
    ("case", "layers", "error", "inside", "absent"),
    [
        ("dot-dot", [{"../victim/owned": b"x"}], "leaves the root", [], []),
        ("absolute path", [{"{victim}/abs": b"x"}], None, ["{victim}/abs"], []),
        (
            "symlink then whiteout",
            [{"link": "->{victim}", "{victim}/secret": b"image"}, {"link/.wh.secret": None}],
            None,
            [],
            ["{victim}/secret"],  # the image's own file went, the host's stayed
        ),
        (
            "relative symlink then whiteout",
            [{"a/b/up": "->" + "../" * 40}, {"a/b/up{victim}/.wh.secret": None}],
            None,
            [],
            [],
        ),
        (
            "symlink then opaque directory",
            [{"link": "->{victim}"}, {"link/keep/.wh..wh..opq": None}],
            None,
            [],
            [],
        ),
        (
            "symlink then write",
            [{"link": "->{victim}"}, {"link/owned": b"x", "link/keep/more": b"y"}],
            None,
            ["{victim}/owned", "{victim}/keep/more", "/link"],
            [],
        ),
        (
            "double-slash symlink",
            [{"link": "->//{victim}"}, {"link/owned": b"x"}],
            None,
            ["{victim}/owned"],
            [],
        ),
        (
            "symlink then write, same layer",
            [{"up": "->..", "up/owned": b"x"}],
            None,
            ["/owned"],
            [],
        ),
        ("whiteout of the parent", [{"a": "DIR"}, {".wh...": None}], "whiteout", [], []),
        ("hard link to outside", [{"stolen": "=>{victim}/secret"}], "stolen", [], []),
        (
            "hard link through a symlink",
            [{"link": "->{victim}", "{victim}/secret": b"image"}, {"stolen": "=>link/secret"}],
            None,
            ["/stolen"],  # linked to the image's file, not the host's
            [],
        ),
        ("symlink loop", [{"a": "->b", "b": "->a"}, {"a/owned": b"x"}], "symbolic links", [], []),
        (
            "device nodes",
            [{"dev/null": "CHR", "dev/sda": "BLK"}],
            None,
            [],
            ["/dev/null", "/dev/sda"],
        ),
    ],
)
def test_import_oci_never_touches_files_outside_its_root(
    tmp_path: Path,
    case: str,
    layers: list[dict[str, bytes | str | None]],
    error: str | None,
    inside: list[str],
    absent: list[str],
) -> None:
    """Hostile layers: nothing they name, through whatever symlinks earlier layers left, reads,
    writes, links or deletes a file of the host. Symlinks resolve inside the image, as the
    guest will resolve them."""
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "secret").write_bytes(b"host")
    (victim / "keep" / "precious").write_bytes(b"host")
    before = _tree(victim)
    work = tmp_path / "work"
    work.mkdir()
    layout = work / "layout"

    def place(text: Any) -> Any:
        return text.format(victim=victim) if isinstance(text, str) else text

    write_oci_layout(
        layout,
        [
            _layer({place(name): place(value) for name, value in layer.items()}, compress=False)
            for layer in layers
        ],
    )
    image = work / "rootfs.ext4"
    if error is None:
        import_oci(layout, image, 16 * MiB)
        for path in inside:
            assert _in_image(image, path.format(victim=victim)), (case, path)
        for path in absent:
            assert not _in_image(image, path.format(victim=victim)), (case, path)
    else:
        with pytest.raises(InvalidArgument, match=error):
            import_oci(layout, image, 16 * MiB)
        assert not image.exists()
    assert _tree(victim) == before, case
    assert sorted(path.name for path in work.iterdir()) == sorted(
        ["layout"] + (["rootfs.ext4"] if error is None else [])
    ), case  # nothing left beside the image either


# --- in a network namespace of the test's own ------------------------------------------------


@pytest.fixture()
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted at the end whatever happened."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"mvtest-fc-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def in_netns(netns: str, args: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(SCENARIO), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def processes_under(state_dir: Path) -> list[psutil.Process]:
    """The stand-ins (and their QEMUs) of one state dir: each runs in its VM's directory."""
    found = []
    for process in psutil.process_iter():
        try:
            if Path(process.cwd()).is_relative_to(state_dir):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def vm_taps(names: list[str]) -> list[str]:
    return [name for name in names if len(name) == 15]  # the bridge is "mvnet0"


def test_failed_launch_leaves_no_process(netns: str, tmp_path: Path, images: Path) -> None:
    """The stand-in boots nothing, so the guest's SSH never answers: the boot fails after its
    timeout and the process must be gone; the tap stays the network service's to unplug."""
    answer = in_netns(
        netns,
        {
            "state_dir": str(tmp_path / "state"),
            "images": str(images),
            "binary": str(STANDIN),
            "boot_timeout": 1,
            "env": {"FIRECRACKER_STANDIN_BOOT": "none"},
        },
    )
    assert "did not answer" in answer["start_error"], answer
    assert vm_taps(answer["taps_before_detach"]) == [answer["tap"]]
    assert vm_taps(answer["taps_after"]) == []
    assert processes_under(tmp_path / "state") == []


def boot_in_netns(netns: str, state: Path, images: Path, **args: Any) -> dict[str, Any]:
    """One VM through the scenario (boot, exec, stop, delete); no process left whatever happens."""
    try:
        answer = in_netns(
            netns, {"state_dir": str(state), "images": str(images), "binary": str(STANDIN), **args}
        )
    finally:
        for process in processes_under(state):  # only if the scenario died half-way
            process.kill()
    assert "start_error" not in answer, answer.get("start_error")
    assert "need the cluster network" in answer["unattached_error"]
    # The node's tap, MAC and address, as its network service gave them.
    assert answer["status"] == ["running", "172.31.90.2"]
    assert answer["tap"] in answer["taps_running"]
    assert answer["guest_mac"].strip() == answer["mac"]
    # The key the guest printed on its console is the one its first login recorded.
    assert answer["host_key_announced"].startswith("ssh-ed25519 ")
    assert answer["host_key_recorded"].split()[:2] == answer["host_key_announced"].split()
    assert answer["status_stopped"] == "stopped" and answer["status_deleted"] == "missing"
    assert vm_taps(answer["taps_after"]) == []
    return answer


@pytest.mark.vm
def test_real_boot_in_a_namespace(netns: str, tmp_path: Path, tiny_image: Path) -> None:
    """Firecracker's defaults: virtio-MMIO, entropy only when asked, Ctrl+Alt+Del to stop."""
    answer = boot_in_netns(netns, tmp_path / "state", tiny_image.parent)
    assert answer["uname"][0] == 0 and answer["uname"][1].endswith("-amd64")
    assert answer["stats"]["ipv4"] == "172.31.90.2" and answer["stats"]["memory_total"] > 0
    device, rng = answer["outputs"][0].split()
    # eth0 sits on the MMIO transport (an ACPI platform device), not on PCI.
    assert "/pci" not in device and "LNRO0005" in device, device
    assert rng.startswith("virtio_rng"), rng  # the driver asked for an entropy device
    # Stop was Ctrl+Alt+Del: the guest's init synced, unmounted and rebooted; the reset ended
    # the process (a kill would leave no "Restarting system" on the console).
    console = answer["console"]
    assert "The system is going down NOW!" in console and "reboot: Restarting system" in console
    assert "guest guest-reset" in console
    print(
        f"firecracker stand-in: boot to SSH {answer['boot_seconds']} s, "
        f"stop {answer['stop_seconds']} s"
    )


@pytest.mark.vm
def test_pci_when_asked_and_poweroff_keeps_the_process(
    netns: str, tmp_path: Path, tiny_image: Path
) -> None:
    """``--enable-pci`` gives PCI devices; a guest poweroff leaves Firecracker running (no ACPI
    power-off on x86), and stop still ends it (a kill after ``stop_timeout``)."""
    answer = boot_in_netns(
        netns, tmp_path / "state", tiny_image.parent, enable_pci=True, poweroff=True,
        stop_timeout=2,
    )  # fmt: skip
    device, _rng = answer["outputs"][0].split()
    assert "/pci" in device, device
    assert answer["after_poweroff"] == "process alive: True, driver says running"
    assert "reboot: Restarting system" not in answer["console"]


@pytest.mark.vm
def test_image_import_turns_an_oci_layout_into_a_bootable_rootfs_image(
    cluster: Cluster, netns: str, tmp_path: Path, tiny_image: Path
) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, [_layer({"etc/motd": b"from an OCI image\n"}, compress=True)])
    cluster.start_master()  # the tiny guest (whose kernel a rootfs boots) comes in at start
    done = cluster.cli(
        "image", "import", str(layout), "--name", "web", "--size", "64M", "--format", "json"
    )
    assert done.code == 0, done.err
    image = done.json()[0]
    assert image["kind"] == "rootfs"
    assert sorted(image["files"]) == ["initrd.img", "rootfs.ext4", "vmlinux"]
    blobs = cluster.root / "master" / "images" / "blobs" / "sha256"
    rootfs = blobs / image["files"]["rootfs.ext4"]["sha256"]
    assert "from an OCI image" in debugfs(rootfs, "cat /etc/motd")
    not_oci = tmp_path / "not-oci"
    not_oci.mkdir()
    (not_oci / "index.json").write_text("{}")
    bad = cluster.cli("image", "import", str(not_oci), "--name", "x")
    assert bad.code != 0 and "manifest" in bad.err.lower(), bad.err
    names = [i["name"] for i in cluster.ok("image", "list", "--format", "json").json()]
    assert names == ["tiny", "web"]
    # Bootable: the image's files as a node's cache holds them, and a VM of it starts with the
    # layer's file on its disk.
    images = tmp_path / "images"
    (images / "web").mkdir(parents=True)
    for name, entry in image["files"].items():
        os.link(blobs / entry["sha256"], images / "web" / name)
    answer = boot_in_netns(
        netns, tmp_path / "state", images, image="web", commands=[["cat", "/data/etc/motd"]]
    )
    assert answer["outputs"][1] == "from an OCI image\n"
