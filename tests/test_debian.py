"""The real guest through the whole stack: `image build debian` imports it into the master's
store, a qemu worker (TCG) that has no image of its own pulls it at `launch debian --cloud-init
FILE`, the user's cloud-config is applied by cloud-init from the NoCloud seed, `exec` reads what
it wrote, and the root file system (a qcow2 overlay on the cached image's disk) is kept across
stop/start.

The Debian image is built once into the shared cache (`make test` builds it before pytest; the
debootstrap step is cached apart) and never written by a VM: each boots its own overlay.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import IMAGE_CACHE, Cluster, new_cluster, qemu_processes_under, wait_until

from multiverse.core.images import sha256_file
from multiverse.drivers.qemu import BASE_FILE
from multiverse.guest.debian import DISK_FILE, build_debian_image, image_is_valid
from multiverse.guest.ssh import announced_host_key

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# systemd and cloud-init under TCG on two busy cores: typically 30-90 s to Running.
BOOT_TIMEOUT = "900"
USER_DATA = """\
#cloud-config
write_files:
- path: /var/lib/proof/hello
  content: hello from cloud-init
runcmd:
- [sh, -c, 'echo "$(hostname) ran" >> /var/lib/proof/runs']
"""


@pytest.fixture(scope="module")
def debian_image() -> Path:
    """The Debian image, built once (a no-op when `make test` built it already)."""
    return build_debian_image(IMAGE_CACHE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, debian_image: Path) -> Iterator[Cluster]:
    with new_cluster(tmp_path_factory.mktemp("debian")) as created:
        # No shared image directory for the processes: the master's store holds only what is
        # imported below, and the worker only what it pulls from it.
        created.env.pop("MULTIVERSE_IMAGE_CACHE", None)
        created.start_master()
        built = created.ok(
            "image", "build", "debian", "--images-dir", str(debian_image.parent),
            "--format", "json", timeout=3600,
        ).json()  # fmt: skip
        assert built["imported"] is True and Path(built["path"]) == debian_image
        created.start_worker("node-a", driver="qemu", capacity="cpus=2,memory=4G,disk=40G")
        yield created


def _cached(cluster: Cluster, node: str) -> Path:
    """The node's cached copy of the debian image, pulled from the master."""
    [stored] = [i for i in cluster.ok("image", "list", "--format", "json").json()
                if i["name"] == "debian"]  # fmt: skip
    return cluster.root / node / "images" / "sha256" / stored["digest"].removeprefix("sha256:")


def test_debian_guest_runs_cloud_init_and_keeps_its_root_fs(
    cluster: Cluster, debian_image: Path, tmp_path: Path
) -> None:
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text(USER_DATA)
    started = time.monotonic()
    cluster.ok(
        "launch", "debian", "--name", "deb-one", "--memory", "512M", "--disk", "4G",
        "--cloud-init", str(user_data), "--timeout", BOOT_TIMEOUT, timeout=float(BOOT_TIMEOUT),
    )  # fmt: skip
    print(f"debian: launch to Running (SSH up, cloud-init done) {time.monotonic() - started:.1f} s")
    instance = cluster.instances()["deb-one"]
    assert instance["state"] == "Running"
    # The release is read from the guest after Running, with the node's next report.
    release = "Debian GNU/Linux 12 (bookworm)"
    wait_until(lambda: cluster.instances()["deb-one"]["release"] == release, timeout=300)

    # Written by cloud-init's write_files (init stage) and runcmd (final stage, after SSH is
    # up: Running waits for cloud-init), with the hostname from the seed's meta-data.
    assert cluster.ok("exec", "deb-one", "--", "cat", "/var/lib/proof/hello").out == (
        "hello from cloud-init"
    )
    assert cluster.ok("exec", "deb-one", "--", "cat", "/var/lib/proof/runs").out == "deb-one ran\n"
    # The overlay is the VM's 4G disk, and cloud-init grew the root file system onto it.
    size = cluster.ok("exec", "deb-one", "--", "df", "-B1", "--output=size", "/").out.split()[-1]
    assert 3.5 * 2**30 < int(size) <= 4 * 2**30

    # The host key cloud-init made is announced on the console and pinned by the driver; the
    # exec after the restart below only connects if the guest still offers that key.
    vm_dir = cluster.root / "node-a" / "qemu" / "vms" / instance["id"]
    pinned = (vm_dir / "ssh_host_key.pub").read_text().split()[:2]
    announced = announced_host_key((vm_dir / "serial.log").read_text(errors="replace"))
    assert announced is not None and announced.split() == pinned

    cluster.ok("exec", "deb-one", "--", "sh", "-c", "echo kept > /var/kept && sync")
    cluster.ok("stop", "deb-one", "--timeout", BOOT_TIMEOUT, timeout=float(BOOT_TIMEOUT))
    assert cluster.instances()["deb-one"]["state"] == "Stopped"
    assert qemu_processes_under(cluster.root / "node-a") == []
    started = time.monotonic()
    cluster.ok("start", "deb-one", "--timeout", BOOT_TIMEOUT, timeout=float(BOOT_TIMEOUT))
    print(f"debian: start to Running {time.monotonic() - started:.1f} s")
    assert cluster.ok("exec", "deb-one", "--", "cat", "/var/kept").out == "kept\n"
    # Same instance id in the seed: cloud-init's once-per-instance steps did not run again.
    assert cluster.ok("exec", "deb-one", "--", "cat", "/var/lib/proof/runs").out == "deb-one ran\n"

    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output", "json", "-U", str(vm_dir / "disk.img")],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 * 2**30
    assert info["backing-filename"] == BASE_FILE
    # The base is the worker's pulled copy (it had no other), its boot hints kept by the store.
    cached = _cached(cluster, "node-a")
    assert (vm_dir / BASE_FILE).samefile(cached / DISK_FILE)
    assert json.loads((cached / "image.json").read_text())["boot"]["seed"] == "nocloud"

    cluster.ok("delete", "deb-one", "--timeout", BOOT_TIMEOUT, timeout=float(BOOT_TIMEOUT))
    assert not vm_dir.exists()
    assert image_is_valid(debian_image)  # the base disks are untouched by all of the above
    assert (
        sha256_file(cached / DISK_FILE)
        == json.loads((cached / "image.json").read_text())["files"][DISK_FILE]["sha256"]
    )


def test_launch_refuses_a_disk_smaller_than_the_image_and_a_broken_cloud_config(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Pulled ahead (a no-op after the test above): the disk's own size is read from the file.
    cluster.ok("image", "pull", "debian", "--node", "node-a", timeout=600)
    vms_dir = cluster.root / "node-a" / "qemu" / "vms"
    before = sorted(vms_dir.iterdir()) if vms_dir.exists() else []
    small = cluster.cli("launch", "debian", "--name", "deb-small", "--disk", "1G")
    assert small.code != 0 and "smaller than image debian's own disk" in small.err
    broken = tmp_path / "broken.yaml"
    broken.write_text("#cloud-config\nwrite_files: [\n")
    bad = cluster.cli("launch", "debian", "--name", "deb-bad", "--cloud-init", str(broken))
    assert bad.code != 0 and "not valid YAML" in bad.err
    assert "deb-small" not in cluster.instances() and "deb-bad" not in cluster.instances()
    assert (sorted(vms_dir.iterdir()) if vms_dir.exists() else []) == before
