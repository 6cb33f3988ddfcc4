"""`appliance install`, `doctor` and `bundle` as a user runs them (through the real CLI)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from appliance.errors import InstallError
from appliance.installer.bundle import open_bundle

ROOT = Path(__file__).resolve().parents[2]


def cli(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.installer.cli_main", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd or ROOT,
        env={**os.environ, "APPLIANCE_HOME": str(home), "COLUMNS": "200",
             "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def text(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def test_install_without_hosts_says_where_to_put_them(tmp_path: Path) -> None:
    proc = cli(tmp_path / "home", "install", cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: no hosts to install" in text(proc)
    assert "Add an install section with install.hosts entries" in text(proc)


def test_install_with_an_inventory_without_the_group(tmp_path: Path) -> None:
    ini = tmp_path / "hosts.ini"
    ini.write_text("[gpus]\ngpu01\n")
    proc = cli(tmp_path / "home", "install", "--inventory", str(ini), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"error: {ini} has no hosts in the group 'appliance'" in text(proc)


def test_invalid_install_section_is_reported_by_field(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text(
        '[install]\nhosts = [{name = "gpu01", adress = "x"}]\n'
    )
    proc = cli(tmp_path / "home", "install", "--check", cwd=tmp_path)
    assert proc.returncode == 1
    # The [install] section is read with the rest of appliance.toml, and told the same way.
    assert "appliance.toml: install.hosts.0.adress: unknown key; did you mean 'address'?" in text(
        proc
    )


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client")
def test_unreachable_host_is_named_with_the_reason(tmp_path: Path) -> None:
    inventory = tmp_path / "install.toml"
    # Nothing listens on port 1 of the loopback: the connection is refused at once.
    inventory.write_text('[[hosts]]\nname = "gpu09"\naddress = "127.0.0.1"\nport = 1\n')
    proc = cli(tmp_path / "home", "doctor", "--inventory", str(inventory), cwd=tmp_path)
    assert proc.returncode == 1
    out = text(proc)
    assert "gpu09: unreachable at task 'Gathering Facts'" in out
    assert "Connection refused" in out
    runs = list((tmp_path / "home" / "installs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-doctor")
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["hosts"]["gpu09"]["unreachable"] == 1


def test_doctor_local_runs_the_preflight_checks_here(tmp_path: Path) -> None:
    proc = cli(tmp_path / "home", "doctor", "--local", "--json", cwd=tmp_path)
    report = json.loads(proc.stdout)
    findings = {f["check"]: f for f in report["findings"]["localhost"]}
    assert set(findings) >= {
        "os",
        "gpus",
        "driver",
        "model_store",
        "secure_boot",
        "ports",
        "time_sync",
    }
    failed = any(f["status"] == "fail" for f in findings.values())
    assert proc.returncode == (1 if failed else 0)
    assert report["hosts"]["localhost"]["failed"] == 0  # report only: the role never fails
    for finding in findings.values():
        if finding["status"] == "fail":
            assert finding["fix"], finding


def test_doctor_table_output(tmp_path: Path) -> None:
    proc = cli(tmp_path / "home", "doctor", "--local", cwd=tmp_path)
    out = text(proc)
    assert "localhost check status detail fix" in out
    assert "Run directory:" in out


def _bundle(path: Path, files: dict[str, bytes], manifest: dict[str, object]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in {**files, "bundle.json": json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(f"appliance-bundle/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_open_bundle_checks_every_file(tmp_path: Path) -> None:
    import hashlib

    wheel = b"not really a wheel"
    manifest = {
        "format": 1,
        "version": "0.1.0",
        "repositories": {
            "nvidia_cuda": "http://mirror/cuda",
            "nvidia_cuda_key": "repos/keys/nvidia_cuda.asc",
        },
        "images": [],
        "files": {
            "wheels/appliance-0.1.0-py3-none-any.whl": hashlib.sha256(wheel).hexdigest(),
            "repos/keys/nvidia_cuda.asc": hashlib.sha256(b"key").hexdigest(),
        },
    }
    good = tmp_path / "good.tar"
    _bundle(
        good,
        {"wheels/appliance-0.1.0-py3-none-any.whl": wheel, "repos/keys/nvidia_cuda.asc": b"key"},
        manifest,
    )
    opened = open_bundle(good, tmp_path / "a")
    extra = opened.extravars()
    assert extra["appliance_package_source"] == "bundle"
    # The hosts get the wheels as one archive: the files alone, owned by root, mode 0644,
    # and the same bytes every time the bundle is opened (so a re-run copies nothing).
    assert extra["appliance_wheel_archive"] == str(tmp_path / "a/wheels.tar")
    with tarfile.open(opened.wheel_archive) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.uname, member.uid) == (
            "appliance-0.1.0-py3-none-any.whl",
            0o644,
            "root",
            0,
        )
        assert tar.extractfile(member).read() == wheel  # type: ignore[union-attr]
    again = open_bundle(good, tmp_path / "again")
    assert again.wheel_archive.read_bytes() == opened.wheel_archive.read_bytes()
    assert extra["appliance_package_spec"] == "appliance==0.1.0"
    assert extra["nvidia_driver_repo_url"] == "http://mirror/cuda"
    assert extra["nvidia_driver_repo_key_file"] == str(
        tmp_path / "a/appliance-bundle/repos/keys/nvidia_cuda.asc"
    )
    # Offline, nothing is pulled; without Grafana's .deb the head gets Prometheus alone.
    assert extra["monitoring_dcgm_pull"] is False
    assert extra["monitoring_grafana_enabled"] is False
    opened.manifest["packages"] = {"grafana": "debs/grafana_11.6.0_amd64.deb"}
    assert opened.extravars()["monitoring_grafana_deb"] == str(
        tmp_path / "a/appliance-bundle/debs/grafana_11.6.0_amd64.deb"
    )
    bad = tmp_path / "bad.tar"
    _bundle(
        bad,
        {
            "wheels/appliance-0.1.0-py3-none-any.whl": b"tampered",
            "repos/keys/nvidia_cuda.asc": b"key",
        },
        manifest,
    )
    with pytest.raises(InstallError, match="is damaged: 1 file"):
        open_bundle(bad, tmp_path / "b")
    with pytest.raises(InstallError, match="no such bundle"):
        open_bundle(tmp_path / "missing.tar", tmp_path / "c")
