"""The cloud-init NoCloud seed: a small ISO 9660 volume labelled ``cidata`` that a guest with
cloud-init reads at boot (the way Multipass, libvirt's virt-install and cloud-localds hand a VM
its configuration without a metadata server).

The volume holds four files:

- ``meta-data``: the instance id (the VM's uuid: cloud-init runs its once-per-instance steps,
  such as the user's script, on the first boot only) and the hostname;
- ``vendor-data``: what Multiverse itself needs, a ``#cloud-config`` that lets the node's SSH
  key in as root (the agent's access) and keeps cloud-init off the network;
- ``user-data``: the user's ``--cloud-init`` file as given, a ``#cloud-config`` YAML, a script
  or anything else cloud-init reads;
- ``network-config``: version 2, a static address when the VM has one, else DHCP on the first
  NIC.

Why vendor-data: Multipass does the same, and it keeps the user's file byte for byte (scripts,
MIME archives and Jinja templates need that). cloud-init merges the two key by key with the
user's winning, so a user cloud-config that sets ``ssh_authorized_keys`` or ``disable_root``
would lock the agent out: only then is the user's YAML rewritten, with the node's key added to
its list and root login kept.

The ISO is written with pycdlib (no genisoimage on the host), with Rock Ridge and Joliet names
as cloud-localds writes them, so every guest's blkid and mount read it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from multiverse.core.errors import InvalidArgument
from multiverse.core.files import write_private

SEED_LABEL = "cidata"
CLOUD_CONFIG_HEADER = "#cloud-config"
# The seed's files, in the order they are written; their ISO 9660 level-1 names are derived.
SEED_FILES = ("meta-data", "user-data", "vendor-data", "network-config")
NIC_NAME = "eth0"
# The boot hint (an image manifest's ``boot.seed``) of images whose guest reads this seed.
SEED_NOCLOUD = "nocloud"

__all__ = [
    "SEED_FILES",
    "SEED_LABEL",
    "SEED_NOCLOUD",
    "GuestNetwork",
    "Seed",
    "read_seed_iso",
    "seed_files",
    "write_seed_iso",
]


@dataclass(frozen=True)
class GuestNetwork:
    """The guest's first NIC: a static ``address`` (CIDR form) or, when empty, DHCP.

    The NIC is found by its MAC and named ``eth0`` by cloud-init (``set-name``), whatever the
    guest's udev would call it: cloud-init's networkd and ENI renderers match on the config's
    interface name, not on a ``match: name`` glob. Without a MAC the config names ``eth0``
    itself, which needs ``net.ifnames=0`` on the guest's kernel command line.
    """

    address: str = ""  # e.g. "10.0.2.15/24"
    gateway: str = ""
    dns: tuple[str, ...] = ()
    mac: str = ""
    search: tuple[str, ...] = ()  # DNS search domains
    mtu: int = 0  # 0: the guest's default


@dataclass(frozen=True)
class Seed:
    """Everything one VM's seed says; built anew at every boot from the VM's config."""

    instance_id: str
    hostname: str
    authorized_keys: tuple[str, ...]
    user_data: str = ""
    network: GuestNetwork = field(default_factory=GuestNetwork)


def seed_files(seed: Seed) -> dict[str, bytes]:
    """The seed's files by name (``SEED_FILES``), as cloud-init's NoCloud source reads them."""
    meta = {"instance-id": seed.instance_id, "local-hostname": seed.hostname}
    return {
        "meta-data": _yaml(meta).encode(),
        "user-data": user_data(seed.user_data, seed.authorized_keys).encode(),
        "vendor-data": (CLOUD_CONFIG_HEADER + "\n" + _yaml(vendor_config(seed))).encode(),
        "network-config": _yaml(network_config(seed.network)).encode(),
    }


def vendor_config(seed: Seed) -> dict[str, Any]:
    """Multiverse's own cloud-config: root login with the node's key and nothing fetched."""
    return {
        "disable_root": False,
        "ssh_authorized_keys": list(seed.authorized_keys),
        "ssh_pwauth": False,
        # The guest may have no way out; a launch must not wait on a mirror.
        "package_update": False,
        "package_upgrade": False,
        "preserve_hostname": False,
    }


def user_data(text: str, authorized_keys: Sequence[str]) -> str:
    """The user's user-data as given, unless it is a cloud-config that would override the
    agent's access (see the module docstring): then that YAML with the keys added back.

    A ``#cloud-config`` that is not a YAML mapping is refused here rather than by the guest,
    where the launch would only time out.
    """
    if not text.startswith(CLOUD_CONFIG_HEADER):
        return text
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InvalidArgument(f"the cloud-init file is not valid YAML: {error}") from error
    if config is None:
        return text
    if not isinstance(config, dict):
        raise InvalidArgument("the cloud-init file's #cloud-config must be a YAML mapping")
    if "ssh_authorized_keys" not in config and "disable_root" not in config:
        return text
    keys = config.get("ssh_authorized_keys") or []
    if not isinstance(keys, list):
        raise InvalidArgument("ssh_authorized_keys in the cloud-init file must be a list")
    merged = {
        **config,
        "ssh_authorized_keys": [*keys, *(key for key in authorized_keys if key not in keys)],
        "disable_root": False,
    }
    return CLOUD_CONFIG_HEADER + "\n" + _yaml(merged)


def network_config(network: GuestNetwork) -> dict[str, Any]:
    """Network config version 2 for the first NIC (cloud-init renders it for the guest)."""
    nic: dict[str, Any] = (
        {"match": {"macaddress": network.mac}, "set-name": NIC_NAME} if network.mac else {}
    )
    if network.address:
        nic["addresses"] = [network.address]
        if network.gateway:
            nic["routes"] = [{"to": "0.0.0.0/0", "via": network.gateway}]
        if network.dns:
            nic["nameservers"] = {"addresses": list(network.dns)}
            if network.search:
                nic["nameservers"]["search"] = list(network.search)
    else:
        nic["dhcp4"] = True
    if network.mtu:
        nic["mtu"] = network.mtu
    return {"version": 2, "ethernets": {NIC_NAME: nic}}


def write_seed_iso(seed: Seed, path: Path) -> None:
    """Write the seed volume to ``path``: mode 0600, replaced atomically (a VM may be reading
    the old one)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=SEED_LABEL, joliet=3, rock_ridge="1.09")
    for name, data in seed_files(seed).items():
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            iso_path=f"/{_iso9660_name(name)};1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    volume = io.BytesIO()
    try:
        iso.write_fp(volume)
    finally:
        iso.close()
    write_private(path, volume.getvalue())  # user data may hold secrets


def read_seed_iso(path: Path) -> dict[str, bytes]:
    """The files of a seed volume by their Rock Ridge names (what the guest sees)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        if iso.pvd.volume_identifier.decode().strip() != SEED_LABEL:
            raise InvalidArgument(f"{path} is not a cloud-init seed (label is not {SEED_LABEL})")
        found = {}
        for name in SEED_FILES:
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            found[name] = out.getvalue()
        return found
    finally:
        iso.close()


def _iso9660_name(name: str) -> str:
    # Plain ISO 9660 allows only A-Z, 0-9 and "_"; readers use the Rock Ridge name anyway.
    stem = "".join(char if char.isalnum() else "_" for char in name.upper())
    return stem + "."


def _yaml(data: Mapping[str, Any]) -> str:
    # No folding of long lines: keys stay one line each, greppable in the guest.
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=1 << 16)
