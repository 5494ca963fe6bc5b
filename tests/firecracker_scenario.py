"""Runs the Firecracker driver inside a network namespace, for tests/test_firecracker_driver.py.

The test starts this under ``ip netns exec NS``: the bridge, the taps and every address the
driver makes then exist only in that namespace, never on the host. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from multiverse.core.errors import MultiverseError
from multiverse.core.sizes import GiB, MiB
from multiverse.drivers.base import VMConfig
from multiverse.drivers.firecracker import FirecrackerDriver, tap_name
from multiverse.drivers.process import HOST_KEY_FILE, pid_alive, read_json
from multiverse.guest.ssh import announced_host_key

# What the guest tells about its devices: the transport under eth0, the entropy source.
DEVICES = "readlink -f /sys/class/net/eth0/device; cat /sys/class/misc/hw_random/rng_current"


def taps() -> list[str]:
    return sorted(
        path.name for path in Path("/sys/class/net").iterdir() if path.name.startswith("mv")
    )


async def scenario(args: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(args.get("env", {}))  # the stand-in's switches reach it through ours
    driver = FirecrackerDriver(
        Path(args["state_dir"]),
        [Path(args["images"])],
        binary=args["binary"],
        bridge=args.get("bridge", "mvbr0"),
        cidr=args.get("cidr", "172.31.90.0/24"),
        boot_timeout=float(args.get("boot_timeout", 120)),
        stop_timeout=float(args.get("stop_timeout", 20)),
        enable_pci=bool(args.get("enable_pci", False)),
    )
    vm = VMConfig(
        id=str(uuid.uuid4()),
        name="fc-1",
        cpus=1,
        memory=256 * MiB,
        disk=GiB,
        image=args.get("image", "tiny"),
    )
    result: dict[str, Any] = {"tap": tap_name(vm.id)}
    vm_dir = driver.vms_dir / vm.id
    console = vm_dir / driver.console_log
    try:
        await driver.create(vm)
        began = time.monotonic()
        try:
            status = await driver.start(vm)
        except MultiverseError as error:
            result["start_error"] = f"{type(error).__name__}: {error.message}"
        else:
            result["boot_seconds"] = round(time.monotonic() - began, 2)
            result["status"] = [status.power.value, status.ipv4]
            result["taps_running"] = taps()
            result["leases_running"] = driver.pool.leases()
            result["host_key_recorded"] = (vm_dir / HOST_KEY_FILE).read_text()
            result["host_key_announced"] = announced_host_key(console.read_text(errors="replace"))
            chunks = [chunk async for chunk in driver.exec(vm, ["uname", "-r"])]
            out = b"".join(chunk.data for chunk in chunks if chunk.stream == 1)
            result["uname"] = [chunks[-1].exit_code, out.decode().strip()]
            stats = await driver.stats(vm)
            result["stats"] = {"ipv4": stats.ipv4, "memory_total": stats.memory_total}
            result["tap_owner"] = Path(f"/sys/class/net/{result['tap']}/owner").read_text().strip()
            result["outputs"] = [
                await output(driver, vm, command)
                for command in [["sh", "-c", DEVICES], *args.get("commands", [])]
            ]
            if args.get("poweroff"):
                result["after_poweroff"] = await power_off_inside(driver, vm, console)
            began = time.monotonic()
            await driver.stop(vm)
            result["stop_seconds"] = round(time.monotonic() - began, 2)
            result["status_stopped"] = (await driver.status(vm)).power.value
            result["console"] = console.read_text(errors="replace")
        result["taps_before_delete"] = taps()
        await driver.delete(vm)
        result["status_deleted"] = (await driver.status(vm)).power.value
        result["taps_after"] = taps()
        result["leases_after"] = driver.pool.leases()
    finally:
        await driver.close()
    return result


async def output(driver: FirecrackerDriver, vm: VMConfig, command: list[str]) -> str:
    chunks = [chunk async for chunk in driver.exec(vm, command)]
    return b"".join(chunk.data for chunk in chunks if chunk.stream == 1).decode()


async def power_off_inside(driver: FirecrackerDriver, vm: VMConfig, console: Path) -> str:
    """``poweroff`` in the guest; then whether Firecracker's process is still there."""
    await output(driver, vm, ["poweroff"])
    deadline = time.monotonic() + 60
    while "reboot: Power down" not in console.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return "the guest did not power off"
        await asyncio.sleep(0.1)
    pid = int((read_json(console.parent / "vm.json") or {}).get("pid", 0))
    return f"process alive: {pid_alive(pid)}, driver says {(await driver.status(vm)).power.value}"


if __name__ == "__main__":
    print(json.dumps(asyncio.run(scenario(json.loads(sys.argv[1])))))
