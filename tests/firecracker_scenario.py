"""Runs the Firecracker driver inside a network namespace, for tests/test_firecracker_driver.py.

The test starts this under ``ip netns exec NS``: the node's network service (worker/network.py)
makes the bridge, the tap and the rules the agent would have it make, and they exist only in
that namespace, never on the host; its dnsmasq is stopped at the end. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from multiverse.core.errors import MultiverseError
from multiverse.core.network import ClusterNetwork, NetworkPlan, Nic, mac_for
from multiverse.core.sizes import GiB, MiB
from multiverse.drivers.base import VMConfig
from multiverse.drivers.firecracker import FirecrackerDriver
from multiverse.drivers.process import HOST_KEY_FILE, pid_alive, read_json
from multiverse.guest.ssh import announced_host_key
from multiverse.worker.network import LinuxNetwork, tap_name

CIDR = "172.31.90.0/24"
GUEST = "172.31.90.2"

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
        boot_timeout=float(args.get("boot_timeout", 120)),
        stop_timeout=float(args.get("stop_timeout", 20)),
        enable_pci=bool(args.get("enable_pci", False)),
    )
    # The node's network as the agent drives it: the master's plan, then the VM's attachment.
    network = LinuxNetwork(Path(args["state_dir"]) / "network")
    vm_id = str(uuid.uuid4())
    gateway = "172.31.90.1"
    nic = Nic(f"{GUEST}/24", mac_for(vm_id), gateway, gateway)
    vm = VMConfig(
        id=vm_id,
        name="fc-1",
        cpus=1,
        memory=256 * MiB,
        disk=GiB,
        image=args.get("image", "tiny"),
    )
    result: dict[str, Any] = {"tap": tap_name(vm.id), "mac": nic.mac}
    vm_dir = driver.vms_dir / vm.id
    console = vm_dir / driver.console_log
    try:
        await driver.create(vm)
        try:  # no attachment: refused, nothing started
            await driver.start(vm)
        except MultiverseError as error:
            result["unattached_error"] = f"{type(error).__name__}: {error.message}"
        await network.ensure(
            NetworkPlan(ClusterNetwork("default", CIDR), f"{gateway}/24", "127.0.0.1", ())
        )
        attached = dataclasses.replace(vm, network=await network.attach(vm.id, nic))
        began = time.monotonic()
        try:
            status = await driver.start(attached)
        except MultiverseError as error:
            result["start_error"] = f"{type(error).__name__}: {error.message}"
        else:
            result["boot_seconds"] = round(time.monotonic() - began, 2)
            result["status"] = [status.power.value, status.ipv4]
            result["taps_running"] = taps()
            result["host_key_recorded"] = (vm_dir / HOST_KEY_FILE).read_text()
            result["host_key_announced"] = announced_host_key(console.read_text(errors="replace"))
            chunks = [chunk async for chunk in driver.exec(vm, ["uname", "-r"])]
            out = b"".join(chunk.data for chunk in chunks if chunk.stream == 1)
            result["uname"] = [chunks[-1].exit_code, out.decode().strip()]
            stats = await driver.stats(vm)
            result["stats"] = {"ipv4": stats.ipv4, "memory_total": stats.memory_total}
            result["guest_mac"] = await output(driver, vm, ["cat", "/sys/class/net/eth0/address"])
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
        result["taps_before_detach"] = taps()
        await network.detach(vm.id)  # as the agent does once the VM stopped
        await driver.delete(vm)
        result["status_deleted"] = (await driver.status(vm)).power.value
        result["taps_after"] = taps()
    finally:
        network._stop_dns()  # it serves the VMs, so it outlives us by design; not here
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
