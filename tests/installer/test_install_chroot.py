"""A real `appliance install --offline` of site.yml against a throwaway Debian 12 host.

The host is a debootstrapped root under an overlay, reached with the chroot connection;
its model store disk is a loop device. The roles that need no GPU run for real:
preflight, model_store, tls, appliance, ray_cluster and firewall (nvidia_driver and
container_runtime see no GPU and skip themselves). Services are installed and enabled
but not started: no systemd runs inside a chroot. The firewall rules are then loaded in
network namespaces made for the test and probed with real connections. Then `install
--check` on the installed host must find nothing to change: that is the idempotence proof
(a second real install took another 100-190 s of the suite's 20 minutes). What check mode
cannot see, a command or shell task that would report a change every run, ansible-lint's
production profile refuses (no-changed-when, tests/installer/test_install_lint.py).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.config import ApplianceConfig, GatewayConfig
from tests.conftest import free_port
from tests.installer.testhosts import loop_devices, netns, overlay_host, require_tools, run

pytestmark = pytest.mark.installer

ROOT = Path(__file__).resolve().parents[2]
SERVER_IP, USER_IP, PEER_IP = "10.231.1.1", "10.231.1.2", "10.231.2.2"


@dataclass
class Cli:
    code: int
    out: str


@dataclass
class Installed:
    root: Path
    home: Path
    inventory: Path
    disks: list[str]
    bundle: Path
    first: Cli
    check: Cli

    def summaries(self) -> list[dict[str, Any]]:
        runs = sorted((self.home / "installs").glob("*/summary.json"))
        return [json.loads(p.read_text()) for p in runs]

    def chroot(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run("chroot", str(self.root), *argv, check=False)

    def install(self, *args: str) -> Cli:
        argv = ["install", "--offline", str(self.bundle), "--inventory", str(self.inventory)]
        proc = subprocess.run(
            [sys.executable, "-m", "tests.installer.cli_main", *argv, *args],
            capture_output=True,
            text=True,
            timeout=1500,
            cwd=ROOT,
            env={**os.environ, "APPLIANCE_HOME": str(self.home), "COLUMNS": "200"},
        )
        return Cli(proc.returncode, proc.stdout + proc.stderr)


def _host_vars(root: Path, disks: list[str]) -> dict[str, Any]:
    tls_ready = "tls_cert" in GatewayConfig.model_fields
    return {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(root),
        "ansible_python_interpreter": "/usr/bin/python3",
        "appliance_node_ip": SERVER_IP,
        # A CPU-only test host. It shares this machine's network, where other tests' Ray
        # may hold the appliance's ports: accepted, so the check reports but does not stop.
        "preflight_require_gpus": False,
        "preflight_accept": ["ports"],
        "model_store_devices": disks,
        "firewall_cluster_addresses": [SERVER_IP, PEER_IP],
        # The gateway serves the certificate once the appliance's config has tls_cert.
        "appliance_gateway_tls": tls_ready,
        # Not Prometheus and Grafana: minutes of packages this run cannot spare, and Grafana's
        # repository is not on the test's mirror. The role is covered by lint, the syntax
        # check, its rendered templates and tests/test_e2e.py's live Prometheus.
        "monitoring_enabled": False,
    }


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, debian: Path, bundle_file: Path
) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("chroot")
    with overlay_host(debian, work / "host") as root, loop_devices(work, 2) as disks:
        inventory = work / "inventory.yml"
        hosts = {"testhost": _host_vars(root, disks[:1])}
        inventory.write_text(yaml.safe_dump({"all": {"children": {"appliance": {"hosts": hosts}}}}))
        home = work / "home"
        state = Installed(root, home, inventory, disks, bundle_file, *[Cli(-1, "")] * 2)
        started = time.monotonic()
        state.first = state.install()
        print(f"first install: {time.monotonic() - started:.0f}s")
        started = time.monotonic()
        if state.first.code == 0:
            state.check = state.install("--check")
        print(f"check-mode install: {time.monotonic() - started:.0f}s")
        yield state


def test_first_install_succeeds(installed: Installed) -> None:
    assert installed.first.code == 0, installed.first.out[-6000:]
    first = installed.summaries()[0]
    assert first["hosts"]["testhost"]["failed"] == 0
    assert first["hosts"]["testhost"]["changed"] > 10
    assert "Building the appliance wheel" not in installed.first.out  # the bundle's wheel
    assert "The appliance is installed." in installed.first.out


def test_check_mode_on_the_installed_host_changes_nothing(installed: Installed) -> None:
    assert installed.check.code == 0, installed.check.out[-6000:]
    check = installed.summaries()[1]
    assert check["changed_tasks"] == []
    assert check["hosts"]["testhost"]["changed"] == 0
    assert "Check mode: nothing was changed (0 task(s) would change)." in installed.check.out


def test_preflight_reports_each_check(installed: Installed) -> None:
    findings = {f["check"]: f for f in installed.summaries()[0]["findings"]["testhost"]}
    assert findings["os"] == {"check": "os", "status": "ok", "detail": "Debian 12", "fix": ""}
    assert findings["gpus"]["detail"] == "no GPU (CPU-only host)"
    assert findings["model_store"]["detail"].startswith(f"{installed.disks[0]} becomes XFS")


def test_model_store_is_xfs_mounted_by_uuid(installed: Installed) -> None:
    mount = installed.root / "srv/appliance/models"
    found = run("findmnt", "-J", "-o", "SOURCE,FSTYPE,LABEL,UUID", "--mountpoint", str(mount))
    (fs,) = json.loads(found.stdout)["filesystems"]
    assert (fs["source"], fs["fstype"], fs["label"]) == (installed.disks[0], "xfs", "appliance")
    fstab = (installed.root / "etc/fstab").read_text().splitlines()
    assert f"UUID={fs['uuid']} /srv/appliance/models xfs defaults,noatime,nofail 0 2" in fstab
    owner = installed.chroot("stat", "-c", "%U:%G %a", "/srv/appliance/models").stdout.strip()
    assert owner == "appliance:appliance 755"


def test_tls_certificate_is_signed_by_the_ca_for_the_host_names(installed: Installed) -> None:
    ca_dir = installed.home / "ca"
    assert oct((ca_dir / "ca.key").stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    tls = installed.root / "etc/appliance/tls"
    cert = x509.load_pem_x509_certificate((tls / "gateway.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (tls / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    sans = {
        str(n.value)
        for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    }
    assert {"testhost", "localhost", "127.0.0.1", SERVER_IP} <= sans
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    key_mode = installed.chroot("stat", "-c", "%U:%G %a", "/etc/appliance/tls/gateway.key")
    assert key_mode.stdout.strip() == "root:appliance 640"
    # The key was made on the host and never copied to the control machine.
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"]


def test_appliance_is_installed_from_the_bundle_with_a_valid_config(installed: Installed) -> None:
    version = installed.chroot("/opt/appliance/venv/bin/appliance", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("appliance ")
    text = (installed.root / "etc/appliance/appliance.toml").read_text()
    data = tomllib.loads(text)
    config = ApplianceConfig.model_validate(data)
    assert config.home == Path("/var/lib/appliance")
    assert config.store.root == Path("/srv/appliance/models")
    assert config.ray.address == f"{SERVER_IP}:6379"
    assert (config.gateway.host, config.gateway.port) == ("0.0.0.0", 443)
    if "tls_cert" in GatewayConfig.model_fields:  # the gateway serves the tls role's certificate
        assert data["gateway"]["tls_cert"] == "/etc/appliance/tls/gateway.pem"
        assert data["gateway"]["tls_key"] == "/etc/appliance/tls/gateway.key"
    else:
        assert "tls_cert" not in data["gateway"]
    # The installed appliance itself accepts the file (the template is validated with it).
    check = installed.chroot(
        "/opt/appliance/venv/bin/appliance", "--config", "/etc/appliance/appliance.toml", "config"
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.skipif(
    "tls_cert" not in GatewayConfig.model_fields, reason="this appliance's gateway has no TLS"
)
def test_gateway_serves_the_issued_certificate(installed: Installed) -> None:
    """The installed gateway, run as the appliance user, answers HTTPS with the host's
    certificate, and a client that trusts only the internal CA accepts it."""
    port = free_port()
    gateway = subprocess.Popen(
        ["chroot", "--userspec=appliance:appliance", str(installed.root),
         "/opt/appliance/venv/bin/python", "-m", "appliance.gateway",
         "--config", "/etc/appliance/appliance.toml", "--host", "127.0.0.1", "--port", str(port),
         "--static-replica", "m=http://127.0.0.1:9", "--no-auth"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ca = ssl.create_default_context(cafile=str(installed.home / "ca" / "ca.pem"))
        deadline = time.monotonic() + 60
        while True:
            assert gateway.poll() is None, gateway.stderr.read() if gateway.stderr else ""
            try:
                reply = httpx.get(f"https://localhost:{port}/healthz", verify=ca, timeout=2)
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        # The gateway also names its instance and address there; the status is what counts.
        assert reply.status_code == 200 and reply.json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://localhost:{port}/healthz", timeout=2)  # the system CAs alone
    finally:
        gateway.terminate()
        gateway.wait(timeout=20)


def test_services_are_installed_and_enabled(installed: Installed) -> None:
    wants = installed.root / "etc/systemd/system/multi-user.target.wants"
    for unit in ("appliance.service", "appliance-ray.service", "appliance-firewall.service"):
        assert (wants / unit).is_symlink(), f"{unit} is not enabled"
    ray = (installed.root / "etc/systemd/system/appliance-ray.service").read_text()
    assert "--head --port=6379" in ray and f"--node-ip-address={SERVER_IP}" in ray
    supervisor = (installed.root / "etc/systemd/system/appliance.service").read_text()
    assert "ExecStart=/opt/appliance/venv/bin/appliance up --foreground" in supervisor
    assert "Requires=appliance-ray.service" in supervisor
    for unit in (ray, supervisor):
        # Back after any exit, a kill -9 included, and never given up on.
        assert "Restart=always" in unit and "StartLimitIntervalSec=0" in unit


def test_unit_files_pass_systemd_analyze_verify(installed: Installed) -> None:
    require_tools("systemd-analyze")
    units = [
        f"/etc/systemd/system/{name}"
        for name in ("appliance.service", "appliance-ray.service", "appliance-firewall.service")
    ]
    # --root: executables, users and paths are resolved inside the installed host.
    result = run("systemd-analyze", "verify", f"--root={installed.root}", *units, check=False)
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if "appliance" in line]
    assert result.returncode == 0 and not ours, output


def test_ray_runs_with_the_clusters_own_token(installed: Installed) -> None:
    token = installed.root / "var/lib/appliance/ray-auth-token"
    kept = installed.home / "cluster" / "ray-auth-token"
    assert token.stat().st_mode & 0o777 == 0o600
    owner = installed.chroot("stat", "-c", "%U", "/var/lib/appliance/ray-auth-token").stdout
    assert owner.strip() == "appliance"
    # The control machine's copy ends with a newline (the lookup's file); the host's does not.
    assert token.read_text() == kept.read_text().strip() and len(token.read_text()) == 64
    ray = (installed.root / "etc/systemd/system/appliance-ray.service").read_text()
    assert "Environment=RAY_AUTH_MODE=token" in ray
    assert "Environment=RAY_AUTH_TOKEN_PATH=/var/lib/appliance/ray-auth-token" in ray
    # The installed supervisor reads the same file, and refuses to run Ray without it.
    config = ApplianceConfig.model_validate({"home": "/var/lib/appliance"})
    from appliance.control.runtime import ray_token_path

    assert ray_token_path(config) == Path("/var/lib/appliance/ray-auth-token")
    assert token.read_text() not in "\n".join(
        p.read_text(errors="replace") for p in (installed.home / "installs").rglob("stdout")
    ), "the token reached the install's logs"


def test_refuses_a_disk_that_holds_a_filesystem(installed: Installed) -> None:
    require_tools("mkfs.ext4", "blkid")
    busy = installed.disks[1]
    run("mkfs.ext4", "-q", "-L", "precious", busy)
    cli = installed.install(
        "--tags", "model_store",
        "-e", f"model_store_devices=[{busy}]",
        "-e", "model_store_mount=/srv/other",
        "-e", "model_store_label=other",
    )  # fmt: skip
    assert cli.code == 1
    text = " ".join(cli.out.split())
    # lsblk learns filesystems from udev, which a chroot lacks; the disk itself tells.
    assert "testhost: failed at task 'Refuse disks that hold data" in text
    assert f"{busy} holds ext4 (label precious)" in text
    assert "model_store_force: true" in text
    blkid = run("blkid", "-o", "value", "-s", "LABEL", busy)
    assert blkid.stdout.strip() == "precious"


LISTENER = """
import socket, sys, selectors
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept(); conn.sendall(b"hi"); conn.close()
"""


def _connects(ns: str, ip: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({ip!r},{port}),timeout=1.5)\n"
        "sys.exit(0 if s.recv(2)==b'hi' else 1)"
    )
    return run("ip", "netns", "exec", ns, sys.executable, "-c", code, check=False).returncode == 0


def test_firewall_admits_users_to_the_gateway_only(installed: Installed) -> None:
    require_tools("ip", "nft")
    rules = installed.root / "etc/appliance/firewall/rules.nft"
    pid = os.getpid()
    srv, user, peer = f"appl-srv-{pid}", f"appl-user-{pid}", f"appl-peer-{pid}"
    with netns(srv, user, peer):
        for other, (srv_ip, other_ip) in (
            (user, (SERVER_IP, USER_IP)),
            (peer, ("10.231.2.1", PEER_IP)),
        ):
            a, b = f"v{pid % 10000}{other[5]}s", f"v{pid % 10000}{other[5]}o"
            run("ip", "link", "add", a, "netns", srv, "type", "veth", "peer", b, "netns", other)
            run("ip", "-n", srv, "addr", "add", f"{srv_ip}/24", "dev", a)
            run("ip", "-n", other, "addr", "add", f"{other_ip}/24", "dev", b)
            run("ip", "-n", srv, "link", "set", a, "up")
            run("ip", "-n", other, "link", "set", b, "up")
        run("ip", "-n", peer, "route", "add", f"{SERVER_IP}/32", "via", "10.231.2.1")
        run("ip", "netns", "exec", srv, "nft", "--file", str(rules))
        listener = subprocess.Popen(
            ["ip", "netns", "exec", srv, sys.executable, "-c", LISTENER, "443", "6379", "8080"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            assert _connects(user, SERVER_IP, 443), "a user cannot reach the gateway"
            assert not _connects(user, SERVER_IP, 6379), "a user reaches Ray's port"
            assert not _connects(user, SERVER_IP, 8080), "a user reaches a port nobody opened"
            assert _connects(peer, SERVER_IP, 6379), "a cluster host cannot reach Ray"
            assert not _connects(peer, SERVER_IP, 8080), "a cluster host reaches a closed port"
        finally:
            listener.terminate()
            listener.wait(timeout=10)
