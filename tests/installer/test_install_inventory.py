"""The [install] section and the inventory it becomes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.errors import InstallError
from appliance.installer.inventory import (
    inventory_hosts,
    load_install_toml,
    render_inventory,
    write_inventory,
)

TOML = """
[install]
user = "admin"
ssh_key = "/home/admin/.ssh/id_ed25519"
public_names = ["llm.example.com"]
admin_networks = ["10.0.0.0/24"]

[[install.hosts]]
name = "gpu01"
address = "10.0.0.11"

[[install.hosts]]
name = "gpu02"
address = "gpu02.example.com"
port = 2222
vars = { model_store_devices = ["/dev/nvme2n1", "/dev/nvme3n1"] }

[install.vars]
nvidia_driver_version = "580.95.05"
"""


def test_toml_becomes_an_inventory(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(TOML)
    inv = render_inventory(load_install_toml(path))
    group = inv["all"]["children"]["appliance"]
    assert list(group["hosts"]) == ["gpu01", "gpu02"]  # the head first
    assert group["hosts"]["gpu01"] == {
        "ansible_host": "10.0.0.11",
        "ansible_port": 22,
        "ansible_user": "admin",
        "appliance_node_ip": "10.0.0.11",
    }
    gpu02 = group["hosts"]["gpu02"]
    assert (gpu02["ansible_port"], gpu02["model_store_devices"]) == (
        2222,
        ["/dev/nvme2n1", "/dev/nvme3n1"],
    )
    assert "appliance_node_ip" not in gpu02  # a name: the roles use the host's own address
    assert group["vars"]["tls_extra_sans"] == ["llm.example.com"]
    assert group["vars"]["firewall_ssh_sources"] == ["10.0.0.0/24"]
    assert group["vars"]["nvidia_driver_version"] == "580.95.05"
    assert group["vars"]["ansible_ssh_private_key_file"] == "/home/admin/.ssh/id_ed25519"
    assert group["vars"]["appliance_gateway_port"] == group["vars"]["firewall_gateway_port"] == 443
    assert "ansible_host_key_checking" not in group["vars"]  # on unless turned off


def test_written_inventory_is_read_by_ansible(tmp_path: Path) -> None:
    path = tmp_path / "install.toml"
    path.write_text(TOML.replace("[install]\n", "").replace("install.", ""))
    inv = write_inventory(load_install_toml(path), tmp_path / "hosts.yml")
    assert yaml.safe_load(inv.read_text())["all"]["children"]["appliance"]["hosts"]
    assert inventory_hosts(inv) == ["gpu01", "gpu02"]


def test_unknown_key_and_duplicate_host_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[install]\nusr = "x"\n[[install.hosts]]\nname = "a"\n[[install.hosts]]\nname = "a"\n'
    )
    with pytest.raises(InstallError) as info:
        load_install_toml(path)
    text = str(info.value)
    assert "install.usr: unknown key" in text
    assert "host names must be unique: a" in text


def test_no_section_and_no_hosts(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("[gateway]\nport = 8000\n")
    with pytest.raises(InstallError, match="has no install section"):
        load_install_toml(path)
    path.write_text("[install]\nuser = 'x'\n")
    with pytest.raises(InstallError, match="no hosts to install"):
        render_inventory(load_install_toml(path))


def test_inventory_without_the_group(tmp_path: Path) -> None:
    ini = tmp_path / "hosts.ini"
    ini.write_text("[gpus]\ngpu01 ansible_host=10.0.0.11\n")
    with pytest.raises(InstallError, match="no hosts in the group 'appliance'"):
        inventory_hosts(ini)
    ini.write_text("[appliance]\ngpu01 ansible_host=10.0.0.11\ngpu02\n")
    assert inventory_hosts(ini) == ["gpu01", "gpu02"]
