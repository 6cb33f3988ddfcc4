"""The hosts to install: the [install] section of appliance.toml, and the inventory it becomes.

    [install]
    user = "admin"                      # SSH user (sudo for the rest)
    ssh_key = "~/.ssh/id_ed25519"
    gateway_port = 443
    public_names = ["llm.example.com"]  # names users call, added to the certificates
    admin_networks = ["10.0.0.0/24"]    # who may SSH in once the firewall is up (empty: anyone)

    [[install.hosts]]
    name = "gpu01"                      # the first host is the head
    address = "10.0.0.11"

    [[install.hosts]]
    name = "gpu02"
    address = "10.0.0.12"
    vars = { model_store_devices = ["/dev/nvme2n1", "/dev/nvme3n1"] }

    [install.vars]                      # role variables for every host
    nvidia_driver_version = "580.95.05"

`appliance install --inventory FILE` takes such a TOML file (with or without the [install]
header), or an Ansible inventory (YAML or INI) that defines the group `appliance`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from appliance.errors import InstallError
from appliance.installer.settings import HostConfig, InstallConfig
from appliance.strict import problems, read_toml

__all__ = ["GROUP", "HostConfig", "InstallConfig", "load_install_toml", "render_inventory"]

GROUP = "appliance"


def parse_install(data: dict[str, Any], source: Path) -> InstallConfig:
    """The install section of a file (an --inventory TOML file, or a test's own)."""
    try:
        return InstallConfig.model_validate(data)
    except ValidationError as exc:
        raise InstallError(
            "\n".join(problems(exc, InstallConfig, source, prefix=("install",))),
            hint="Fix the fields named above (docs/install.md).",
        ) from None


def load_install_toml(path: Path) -> InstallConfig:
    """A TOML file with an [install] table, or one that is only the install section."""
    data = read_toml(path, InstallError, "install configuration")
    section = data.get("install", data if "hosts" in data else None)
    if section is None:
        raise InstallError(
            f"{path} has no install section",
            hint="Add an install section with install.hosts entries (docs/install.md).",
        )
    return parse_install(section, path)


def render_inventory(config: InstallConfig) -> dict[str, Any]:
    """The YAML inventory for ansible-runner: group `appliance`, head first."""
    if not config.hosts:
        raise InstallError(
            "no hosts to install",
            hint="List them as install.hosts in appliance.toml, or pass --inventory FILE.",
        )
    hosts: dict[str, Any] = {}
    for host in config.hosts:
        address = host.address or host.name
        entry: dict[str, Any] = {"ansible_host": address, "ansible_port": host.port}
        if host.user or config.user:
            entry["ansible_user"] = host.user or config.user
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", address):
            entry["appliance_node_ip"] = address
        entry.update(host.vars)
        hosts[host.name] = entry
    group_vars: dict[str, Any] = {
        "ansible_become": config.become,
        "appliance_gateway_port": config.gateway_port,
        "firewall_gateway_port": config.gateway_port,
        "preflight_gateway_port": config.gateway_port,
        "tls_extra_sans": list(config.public_names),
        "firewall_ssh_sources": list(config.admin_networks),
    }
    if config.ssh_key is not None:
        group_vars["ansible_ssh_private_key_file"] = str(config.ssh_key.expanduser())
    if not config.host_key_checking:
        group_vars["ansible_host_key_checking"] = False
    group_vars.update(config.vars)
    return {"all": {"children": {GROUP: {"hosts": hosts, "vars": group_vars}}}}


def write_inventory(config: InstallConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render_inventory(config), sort_keys=False))
    return path


def inventory_hosts(path: Path) -> list[str]:
    """The hosts of group `appliance` in any Ansible inventory, as ansible-inventory sees them."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(path), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise InstallError(
            f"ansible-inventory cannot read {path}: {proc.stderr.strip()[-500:]}",
            hint="Check the inventory's syntax (YAML or INI).",
        )
    data = json.loads(proc.stdout)
    hosts = list(data.get(GROUP, {}).get("hosts", []))
    if not hosts:
        raise InstallError(
            f"{path} has no hosts in the group '{GROUP}'",
            hint=f"Put the hosts to install in a group named {GROUP}; the first is the head.",
        )
    return hosts
