"""The image store and its sync to workers, with real processes: a master, workers with data
dirs of their own, the CLI, and (in one test) a real VM that boots from a pulled image."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import Cluster, wait_until

from multiverse.core.images import sha256_file

MiB = 1024 * 1024


def _no_seeds(cluster: Cluster) -> None:
    """Processes that see no image directory: the master's store starts empty and workers
    have nothing but what they pull."""
    cluster.env.pop("MULTIVERSE_IMAGE_CACHE", None)


def _api(cluster: Cluster, method: str, path: str, **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {cluster.token}"}
    return cluster.http.request(method, f"{cluster.api}/api/v1{path}", headers=headers, **kwargs)  # type: ignore[arg-type]


def _wait_operation(cluster: Cluster, operation_id: str, timeout: float = 300) -> dict[str, object]:
    def finished() -> dict[str, object] | None:
        answer = _api(cluster, "GET", f"/operations/{operation_id}/wait", params={"timeout": 5})
        item: dict[str, object] = answer.json()
        return item if item["status"] != "running" else None

    result: dict[str, object] = wait_until(finished, timeout=timeout)
    return result


def _transfers(cluster: Cluster, sha256: str, node: str) -> list[tuple[int, int, str]]:
    """(offset, bytes sent, outcome) of each transfer of a blob, from the master's log."""
    assert cluster.master is not None
    pattern = re.compile(
        rf"image transfer sha256:{sha256} to node {node}: offset (\d+) sent (\d+) bytes of \d+, "
        r"(\w+)"
    )
    return [(int(o), int(s), outcome) for o, s, outcome in pattern.findall(cluster.master.output())]


@pytest.fixture
def tiny_dir(tiny_image: Path) -> Path:
    return tiny_image


@pytest.mark.vm
def test_a_fresh_worker_pulls_verifies_and_boots_an_imported_image(
    cluster: Cluster, tiny_dir: Path
) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    _no_seeds(cluster)
    # Throttled (about 3 s for the 70 MB guest), so that the pull's progress can be seen.
    cluster.start_master("--image-rate-limit", "24M")
    assert cluster.ok("image", "list", "--format", "json").json() == []
    imported = cluster.ok("image", "import", str(tiny_dir), "--name", "tiny", "--format", "json")
    image = imported.json()[0]
    assert image["kind"] == "kernel+initrd" and image["digest"].startswith("sha256:")
    cluster.start_worker("fresh", driver="qemu", capacity="cpus=2,memory=2G,disk=20G")
    worker_images = cluster.root / "fresh" / "images"
    assert not (worker_images / "sha256").exists() or not any((worker_images / "sha256").iterdir())

    unknown = cluster.cli("launch", "nosuch", "--name", "vm0")
    assert unknown.code != 0 and "'nosuch' does not exist" in unknown.err
    assert "vm0" not in cluster.instances()

    cluster.ok("launch", "tiny", "--name", "vm1", "--memory", "256M", "--disk", "64M",
               "--no-wait")  # fmt: skip
    # While it is Creating, the instance (and so the launch's progress) tells the pull.
    wait_until(lambda: "pulling image tiny" in cluster.instances()["vm1"]["message"], timeout=60)
    wait_until(lambda: cluster.instances()["vm1"]["state"] == "Running", timeout=600, interval=1)
    assert cluster.instances()["vm1"]["message"] == ""
    cached = worker_images / "sha256" / image["digest"].removeprefix("sha256:")
    for name, entry in image["files"].items():
        assert sha256_file(cached / name) == entry["sha256"]
    exec_result = cluster.ok("exec", "vm1", "--", "uname", "-r")
    assert exec_result.out.strip().endswith("-amd64")
    # The store knows who holds it (from the worker's reports), and `images` shows the node.
    wait_until(
        lambda: cluster.ok("image", "list", "--format", "json").json()[0]["nodes"] == ["fresh"]
    )
    assert "fresh" in cluster.ok("images").out
    # In use: refused, and nothing changes.
    refused = cluster.cli("image", "delete", "tiny")
    assert refused.code != 0 and "in use" in refused.err
    assert [i["name"] for i in cluster.ok("image", "list", "--format", "json").json()] == ["tiny"]
    cluster.ok("delete", "vm1", timeout=300)
    cluster.ok("image", "delete", "tiny")
    assert cluster.ok("image", "list", "--format", "json").json() == []


def test_a_killed_pull_resumes_from_its_offset_and_a_damaged_copy_is_pulled_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    _no_seeds(cluster)
    disk = tmp_path / "big.raw"
    with disk.open("wb") as file:
        for _ in range(200):
            file.write(os.urandom(MiB))
    sha = sha256_file(disk)
    # Throttled, so that the worker can be killed half-way whatever the machine's speed.
    cluster.start_master("--image-rate-limit", "40M")
    image = cluster.ok("image", "import", str(disk), "--name", "big", "--format", "json").json()[0]
    assert image["kind"] == "disk" and image["files"] == {
        "disk.raw": {"sha256": sha, "size": 200 * MiB}
    }
    worker = cluster.start_worker("w1", driver="qemu")
    started = _api(cluster, "POST", "/image-store/big/pull", json={"nodes": ["w1"]})
    assert started.status_code == 202, started.text
    partial = cluster.root / "w1" / "images" / "partial" / image["digest"].removeprefix("sha256:")
    wait_until(lambda: (partial / "disk.raw").exists()
               and (partial / "disk.raw").stat().st_size > 60 * MiB, timeout=120)  # fmt: skip
    worker.kill(signal.SIGKILL)
    offset = (partial / "disk.raw").stat().st_size
    assert 0 < offset < 200 * MiB
    assert _wait_operation(cluster, started.json()["id"])["status"] == "failure"

    cluster.start_worker("w1", driver="qemu")  # the same data dir: it re-joins and resumes
    cluster.ok("image", "pull", "big", "--node", "w1", timeout=300)
    cached = cluster.root / "w1" / "images" / "sha256" / image["digest"].removeprefix("sha256:")
    assert sha256_file(cached / "disk.raw") == sha
    wait_until(lambda: (offset, 200 * MiB - offset, "complete") in _transfers(cluster, sha, "w1"))

    # One flipped byte in the cached copy: found at the next use, pulled again in full.
    with (cached / "disk.raw").open("r+b") as file:
        file.seek(123_456)
        byte = file.read(1)
        file.seek(123_456)
        file.write(bytes([byte[0] ^ 0x01]))
    cluster.ok("image", "pull", "big", "--node", "w1", timeout=300)
    assert sha256_file(cached / "disk.raw") == sha
    wait_until(lambda: (0, 200 * MiB, "complete") in _transfers(cluster, sha, "w1"))
    listed = cluster.ok("image", "list", "--format", "json").json()
    wait_until(lambda: cluster.ok("image", "list", "--format", "json").json()[0]["nodes"] == ["w1"])
    assert listed[0]["name"] == "big"


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on loopback serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_url_import_checks_the_sha256_and_bad_input_changes_nothing(
    cluster: Cluster, web_server: tuple[str, Path]
) -> None:
    _no_seeds(cluster)
    base, root = web_server
    qcow2 = root / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    sha = sha256_file(qcow2)
    cluster.start_master()

    wrong = cluster.cli("image", "import", f"{base}/cloud.qcow2", "--name", "cloud",
                        "--sha256", "0" * 64)  # fmt: skip
    assert wrong.code != 0 and "not the expected" in wrong.err
    no_sha = cluster.cli("image", "import", f"{base}/cloud.qcow2", "--name", "cloud")
    assert no_sha.code != 0 and "--sha256" in no_sha.err
    assert cluster.ok("image", "list", "--format", "json").json() == []
    blobs = cluster.root / "master" / "images" / "blobs" / "sha256"
    assert list(blobs.iterdir()) == []

    done = cluster.ok("image", "import", f"{base}/cloud.qcow2", "--name", "cloud",
                      "--sha256", sha, "--format", "json")  # fmt: skip
    image = done.json()[0]
    assert image["kind"] == "disk" and list(image["files"]) == ["disk.qcow2"]
    assert image["files"]["disk.qcow2"]["sha256"] == sha

    # Bad input over the API: 4xx with the error body, and nothing changes.
    def status(method: str, path: str, **kwargs: object) -> tuple[int, str]:
        answer = _api(cluster, method, path, **kwargs)
        return answer.status_code, answer.json()["error"]["code"] if answer.content else ""

    assert status("DELETE", "/image-store/nosuch") == (404, "not_found")
    assert status("POST", "/image-store/nosuch/pull", json={"all": True}) == (404, "not_found")
    assert status("POST", "/image-store/cloud/pull", json={"nodes": ["nonode"]}) == (
        404, "not_found",
    )  # fmt: skip
    assert status("PUT", "/blobs/sha256:xyz", content=b"abc")[0] == 400
    mismatched = hashlib.sha256(b"other").hexdigest()
    assert status("PUT", f"/blobs/sha256:{mismatched}", content=b"abc") == (400, "invalid_argument")
    assert not (blobs / mismatched).exists()
    assert status("POST", "/image-store", json={"name": "x", "files": {"a": "1" * 64}})[0] == 400
    again = {"name": "cloud", "url": f"{base}/cloud.qcow2", "sha256": sha}
    assert status("POST", "/image-store", json=again) == (409, "already_exists")
    bad_name = {"name": "bad name!", "url": f"{base}/x", "sha256": sha}
    assert status("POST", "/image-store", json=bad_name)[0] == 400
    assert [i["name"] for i in cluster.ok("image", "list", "--format", "json").json()] == ["cloud"]
    assert len(list(blobs.iterdir())) == 1


def test_delete_is_refused_while_an_instance_uses_the_image(
    cluster: Cluster, tiny_dir: Path
) -> None:
    cluster.start_master()  # with the image cache in sight: tiny is imported at the first start
    listed = cluster.ok("image", "list", "--format", "json").json()
    assert [i["name"] for i in listed] == ["tiny"]
    cluster.start_worker("node-a")
    cluster.ok("launch", "tiny", "--name", "user")
    refused = cluster.cli("image", "delete", "tiny")
    assert refused.code != 0 and "in use by instance(s) user" in refused.err
    assert [i["name"] for i in cluster.ok("image", "list", "--format", "json").json()] == ["tiny"]
    missing = cluster.cli("image", "delete", "nosuch")
    assert missing.code != 0 and "does not exist" in missing.err


def _metric(cluster: Cluster, name: str) -> float:
    headers = {"Authorization": f"Bearer {cluster.token}"}
    text = cluster.http.get(f"{cluster.api}/metrics", headers=headers).text
    match = re.search(rf"^{name}_total (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_workers_pulling_one_image_at_once_share_the_masters_reads(
    cluster: Cluster, tmp_path: Path
) -> None:
    _no_seeds(cluster)
    disk = tmp_path / "shared.raw"
    disk.write_bytes(os.urandom(48 * MiB))
    cluster.start_master("--image-rate-limit", "24M")  # both pulls run side by side
    cluster.ok("image", "import", str(disk), "--name", "shared")
    for name in ("w1", "w2"):
        cluster.start_worker(name, driver="qemu")
    cluster.ok("image", "pull", "shared", "--all", timeout=300)
    for name in ("w1", "w2"):
        cached = list((cluster.root / name / "images" / "sha256").glob("*/disk.raw"))
        assert [sha256_file(path) for path in cached] == [sha256_file(disk)]
    assert _metric(cluster, "multiverse_image_sent_bytes") == 2 * 48 * MiB
    # Read once for both (a chunk or two more at most, where one puller got ahead).
    assert _metric(cluster, "multiverse_image_read_bytes") <= 50 * MiB
