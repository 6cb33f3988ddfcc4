"""The model store on several disks: an mdadm RAID0 with XFS, recorded in mdadm.conf.

Needs a kernel with the md driver; where there is none (CONFIG_MD unset, as on some VM
kernels) the RAID0 path is covered in check mode only (test_install_gpu_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.installer.testhosts import loop_devices, overlay_host, require_tools, run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.installer,
    pytest.mark.skipif(
        not Path("/proc/mdstat").exists(),
        reason="this kernel has no md driver (/proc/mdstat missing): RAID0 runs in check mode only",
    ),
]


def test_raid0_store_on_two_disks_then_nothing_changes(
    tmp_path: Path, debian: Path, bundle_file: Path
) -> None:
    require_tools("mdadm")
    with overlay_host(debian, tmp_path / "host") as root, loop_devices(tmp_path, 2) as disks:
        inventory = tmp_path / "inventory.yml"
        md_name = f"appl-test-{os.getpid()}"
        host = {
            "ansible_connection": "community.general.chroot",
            "ansible_host": str(root),
            "ansible_python_interpreter": "/usr/bin/python3",
            "model_store_devices": disks,
            "model_store_md_name": md_name,
        }
        inventory.write_text(
            yaml.safe_dump({"all": {"children": {"appliance": {"hosts": {"raidhost": host}}}}})
        )
        md = Path("/dev/md") / md_name
        try:
            for _ in range(2):
                proc = subprocess.run(
                    [sys.executable, "-m", "tests.installer.cli_main", "install", "--offline",
                     str(bundle_file), "--inventory", str(inventory), "--tags", "model_store"],
                    capture_output=True, text=True, timeout=900, cwd=ROOT,
                    env={**os.environ, "APPLIANCE_HOME": str(tmp_path / "home")},
                )  # fmt: skip
                assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
            runs = sorted((tmp_path / "home" / "installs").glob("*/summary.json"))
            first, second = (json.loads(p.read_text()) for p in runs)
            assert ["raidhost", "Create the RAID0 array from the disks"] in first["changed_tasks"]
            assert second["changed_tasks"] == []
            level = run("mdadm", "--detail", "--export", str(md)).stdout
            assert "MD_LEVEL=raid0" in level and "MD_DEVICES=2" in level
            conf = (root / "etc/mdadm/mdadm.conf").read_text()
            assert f"ARRAY {md} " in conf
            found = run(
                "findmnt",
                "-J",
                "-o",
                "FSTYPE,LABEL",
                "--mountpoint",
                str(root / "srv/appliance/models"),
            )
            assert json.loads(found.stdout)["filesystems"][0] == {
                "fstype": "xfs",
                "label": "appliance",
            }
        finally:
            run("umount", "-l", str(root / "srv/appliance/models"), check=False)
            run("mdadm", "--stop", str(md), check=False)
            for disk in disks:
                run("mdadm", "--zero-superblock", disk, check=False)
