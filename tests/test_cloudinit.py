"""The cloud-init NoCloud seed, written with pycdlib and read back with it (and with blkid, as
the guest's udev finds it). The guest reading it for real: tests/test_debian.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pycdlib
import pytest
import yaml

from multiverse.core.errors import InvalidArgument
from multiverse.guest.cloudinit import (
    SEED_FILES,
    GuestNetwork,
    Seed,
    read_seed_iso,
    user_data,
    write_seed_iso,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMultiverseNodeKey multiverse-node"
MAC = "52:54:00:0b:7c:01"
STATIC = GuestNetwork("10.0.2.15/24", "10.0.2.2", ("10.0.2.3",), MAC)


def seed(user: str = "", network: GuestNetwork = STATIC) -> Seed:
    return Seed("0b7c-uuid", "vm-one", (KEY,), user_data=user, network=network)


def written(tmp_path: Path, value: Seed) -> dict[str, bytes]:
    path = tmp_path / "seed.iso"
    write_seed_iso(value, path)
    return read_seed_iso(path)


def test_seed_volume_holds_meta_vendor_user_and_network_data(tmp_path: Path) -> None:
    script = "#!/bin/sh\necho hello > /var/hello\n"
    files = written(tmp_path, seed(script))
    assert set(files) == set(SEED_FILES)
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "0b7c-uuid", "local-hostname": "vm-one"}
    assert files["user-data"].decode() == script  # a script goes through byte for byte
    vendor = files["vendor-data"].decode()
    assert vendor.startswith("#cloud-config\n")
    config = yaml.safe_load(vendor)
    assert config["ssh_authorized_keys"] == [KEY] and config["disable_root"] is False
    network = yaml.safe_load(files["network-config"])
    assert network == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": MAC},
                "set-name": "eth0",
                "addresses": ["10.0.2.15/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "10.0.2.2"}],
                "nameservers": {"addresses": ["10.0.2.3"]},
            }
        },
    }


def test_seed_volume_is_labelled_cidata_with_rock_ridge_and_joliet_names(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(seed(), path)
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        joliet = sorted(child.file_identifier().decode("utf-16-be")
                        for child in iso.list_children(joliet_path="/")
                        if child.is_file())  # fmt: skip
        assert joliet == sorted(SEED_FILES)
    finally:
        iso.close()
    blkid = shutil.which("blkid", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if blkid:  # what the guest's udev does to find the volume
        found = subprocess.run([blkid, "-o", "export", str(path)], capture_output=True, text=True)
        assert "LABEL=cidata" in found.stdout and "TYPE=iso9660" in found.stdout


def test_dhcp_when_the_vm_has_no_address_and_eth0_when_its_mac_is_unknown(
    tmp_path: Path,
) -> None:
    files = written(tmp_path, seed(network=GuestNetwork(mac=MAC)))
    ethernets = yaml.safe_load(files["network-config"])["ethernets"]
    assert ethernets == {"eth0": {"match": {"macaddress": MAC}, "set-name": "eth0", "dhcp4": True}}
    files = written(tmp_path, seed(network=GuestNetwork()))
    assert yaml.safe_load(files["network-config"])["ethernets"] == {"eth0": {"dhcp4": True}}


def test_a_rewritten_seed_replaces_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(seed("#!/bin/sh\necho one\n"), path)
    write_seed_iso(seed("#!/bin/sh\necho two\n"), path)
    assert read_seed_iso(path)["user-data"] == b"#!/bin/sh\necho two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]
    assert path.stat().st_mode & 0o777 == 0o600  # the user's data may hold secrets


def test_user_cloud_config_stays_as_written_unless_it_touches_the_agents_access() -> None:
    plain = "#cloud-config\n# mine\nwrite_files:\n- path: /var/x\n  content: hi\n"
    assert user_data(plain, [KEY]) == plain  # comments and all: cloud-init merges it
    assert user_data("", [KEY]) == ""
    assert user_data("#cloud-config\n", [KEY]) == "#cloud-config\n"


def test_user_keys_and_disable_root_are_merged_with_the_agents_key() -> None:
    mine = "ssh-ed25519 AAAAUserKey me@laptop"
    text = f"#cloud-config\ndisable_root: true\nssh_authorized_keys: ['{mine}']\nruncmd: [ls]\n"
    merged = user_data(text, [KEY])
    assert merged.startswith("#cloud-config\n")
    config = yaml.safe_load(merged)
    assert config == {"disable_root": False, "ssh_authorized_keys": [mine, KEY], "runcmd": ["ls"]}
    # Already listed: not twice.
    again = yaml.safe_load(user_data(merged, [KEY]))
    assert again["ssh_authorized_keys"] == [mine, KEY]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("#cloud-config\nwrite_files: [\n", "not valid YAML"),
        ("#cloud-config\n- a\n- b\n", "must be a YAML mapping"),
        ("#cloud-config\nssh_authorized_keys: one-key\n", "must be a list"),
    ],
)
def test_broken_cloud_config_is_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        user_data(text, [KEY])


def test_reading_a_volume_that_is_not_a_seed_fails(tmp_path: Path) -> None:
    path = tmp_path / "other.iso"
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="OTHER", rock_ridge="1.09")
    iso.write(str(path))
    iso.close()
    with pytest.raises(InvalidArgument, match="not a cloud-init seed"):
        read_seed_iso(path)
