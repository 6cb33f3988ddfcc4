#!/usr/bin/python
"""Ansible module: every read-only probe of the preflight checks, in one module run."""
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: appliance_probe
short_description: Run the preflight probes of a host and return their raw outputs
description:
  - Runs lspci, nvidia-smi (the GPU query, then the topology when the query worked), lsblk,
    mokutil, ss and timedatectl, and looks for the running kernel's headers and an installed
    appliance. Nothing is changed, so it runs in check mode too.
  - One module run instead of one task per probe, each a round trip to the host (nine per
    host, and as many skipped tasks again in every role that imports the probes).
  - Each command's result has the keys the command module returns (rc, stdout and stderr
    without trailing newlines); a command the host does not have has rc 127, the shell's
    "command not found", and says so in msg.
options:
  kernel:
    description: The running kernel's release (the kernel fact), whose headers are looked for.
    type: str
    required: true
author: appliance
"""

RETURN = r"""
probe:
  description: >-
    lspci, smi_query, smi_topo, lsblk, mokutil, ss, timedatectl (command results; smi_topo is
    {skipped: true} when the GPU query failed), kernel_headers and installed (booleans).
  type: dict
  returned: always
"""

import os

from ansible.module_utils.basic import AnsibleModule

SMI_QUERY = (
    "--query-gpu=index,name,pci.bus_id,driver_version,vbios_version,memory.total,persistence_mode"
)
LSBLK_OUTPUT = (
    "NAME,PATH,TYPE,SIZE,MODEL,SERIAL,TRAN,ROTA,RO,RM,FSTYPE,LABEL,UUID,PTTYPE,MOUNTPOINTS"
)
COMMAND_NOT_FOUND = 127
INSTALLED_UNIT = "/etc/systemd/system/appliance-ray.service"


def _run(module: AnsibleModule, argv: list[str]) -> dict[str, object]:
    # get_bin_path also looks in the sbin directories, which a login user's PATH may lack.
    path = module.get_bin_path(argv[0])
    if path is None:
        return {
            "rc": COMMAND_NOT_FOUND,
            "stdout": "",
            "stderr": "",
            "msg": f"{argv[0]}: No such file or directory (not installed on this host)",
            "cmd": " ".join(argv),
        }
    rc, out, err = module.run_command([path, *argv[1:]])
    return {
        "rc": rc,
        "stdout": out.rstrip("\r\n"),
        "stderr": err.rstrip("\r\n"),
        "cmd": " ".join(argv),
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={"kernel": {"type": "str", "required": True}},
        supports_check_mode=True,
    )
    probe: dict[str, object] = {"lspci": _run(module, ["lspci", "-Dnn", "-d", "10de:"])}
    query = _run(module, ["nvidia-smi", SMI_QUERY, "--format=csv"])
    probe["smi_query"] = query
    probe["smi_topo"] = (
        _run(module, ["nvidia-smi", "topo", "-m"]) if query["rc"] == 0 else {"skipped": True}
    )
    probe["lsblk"] = _run(module, ["lsblk", "--json", "--bytes", "--output", LSBLK_OUTPUT])
    probe["mokutil"] = _run(module, ["mokutil", "--sb-state"])
    probe["ss"] = _run(module, ["ss", "-H", "-ltn"])
    probe["timedatectl"] = _run(module, ["timedatectl", "show"])
    # lexists, as the stat module's exists: build is a symlink into the headers package.
    probe["kernel_headers"] = os.path.lexists(f"/lib/modules/{module.params['kernel']}/build")
    probe["installed"] = os.path.lexists(INSTALLED_UNIT)
    module.exit_json(changed=False, probe=probe)


if __name__ == "__main__":
    main()
