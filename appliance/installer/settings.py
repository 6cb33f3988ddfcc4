"""The install section of appliance.toml: the hosts, how to reach them, role variables.

Plain pydantic, importable from appliance.config without a cycle:

    from appliance.installer.settings import InstallConfig
    install: InstallConfig = InstallConfig()
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from appliance.strict import FilePath, Port, Strict

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HostConfig(Strict):
    name: str = Field(description="Inventory name of the host (also its certificate's CN).")
    address: str | None = Field(
        None, description="Address to SSH to and that other hosts use; default: the name."
    )
    port: Port = Field(22, description="SSH port.")
    user: str | None = Field(None, description="SSH user for this host (default: install.user).")
    vars: dict[str, Any] = Field(default_factory=dict, description="Role variables for this host.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return value


class InstallConfig(Strict):
    hosts: list[HostConfig] = Field(
        default_factory=list, description="Hosts to install; the first one is the head."
    )
    user: str | None = Field(None, description="SSH user (default: the current user).")
    ssh_key: FilePath | None = Field(None, description="SSH private key.")
    become: bool = Field(True, description="Use sudo on the hosts.")
    host_key_checking: bool = Field(True, description="Refuse hosts whose SSH key is unknown.")
    gateway_port: Port = Field(443, description="Port users reach the gateway at (HTTPS).")
    public_names: list[str] = Field(
        default_factory=list,
        description="DNS names and addresses users call the appliance by; added to the "
        "certificates.",
    )
    admin_networks: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) allowed to SSH to the hosts once the firewall is up; "
        "empty: anyone.",
    )
    vars: dict[str, Any] = Field(default_factory=dict, description="Role variables for every host.")

    @field_validator("hosts")
    @classmethod
    def _unique(cls, hosts: list[HostConfig]) -> list[HostConfig]:
        names = [h.name for h in hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"host names must be unique: {', '.join(dupes)}")
        return hosts
