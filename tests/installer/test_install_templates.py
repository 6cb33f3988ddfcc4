"""The roles' templates rendered by Ansible for a head and a worker host, then checked:
appliance.toml against the appliance's own config model, the nftables rules with `nft -c`,
the units and the apt pinning files by content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from appliance.config import ApplianceConfig, GatewayConfig
from tests.installer.testhosts import require_tools

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
ROLES = PLAYBOOKS / "roles"
TEMPLATES = {
    "appliance.toml": "appliance/templates/appliance.toml.j2",
    "appliance.service": "appliance/templates/appliance.service.j2",
    "appliance-ray.service": "ray_cluster/templates/appliance-ray.service.j2",
    "firewall.nft": "firewall/templates/firewall.nft.j2",
    "appliance-firewall.service": "firewall/templates/appliance-firewall.service.j2",
    "nvidia-pin.pref": "nvidia_driver/templates/nvidia-pin.pref.j2",
    "51appliance-nvidia": "nvidia_driver/templates/51appliance-nvidia.j2",
    "nvidia-cuda.sources": "nvidia_driver/templates/nvidia-cuda.sources.j2",
    "grafana-datasources.yaml": "monitoring/templates/grafana-datasources.yaml.j2",
    "grafana-dashboards.yaml": "monitoring/templates/grafana-dashboards.yaml.j2",
    "grafana-server.conf": "monitoring/templates/grafana-server.conf.j2",
    "appliance-dcgm-exporter.service": "monitoring/templates/appliance-dcgm-exporter.service.j2",
}
TLS = "tls_cert" in GatewayConfig.model_fields


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("templates")
    out = work / "out"
    # What the monitoring role's probe step finds: 8 GPUs on the head, none on gpu02.
    hosts = {
        "gpu01": {"appliance_node_ip": "10.0.0.11", "monitoring_host": {"gpu_count": 8}},
        "gpu02": {"appliance_node_ip": "10.0.0.12", "monitoring_host": {"gpu_count": 0}},
    }
    group_vars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    # Extra vars: the role defaults are loaded as vars_files here, which outrank inventory.
    settings = {
        "firewall_ssh_sources": ["10.0.0.0/24", "192.168.10.5"],
        "firewall_extra_tcp_ports": [9100],
        "appliance_gateway_tls": TLS,
        "appliance_config_sections": {
            "serve": {"health_check_period_s": 5},
            "gateway": {"request_timeout_s": 300.0},
        },
        "nvidia_driver_plan": {
            "repository": "https://mirror.example.com/cuda/ubuntu2204/x86_64",
            "packages": ["nvidia-headless-580-open", "nvidia-utils-580"],
            "fabric_packages": ["nvidia-fabricmanager-580", "libnvidia-nscq-580"],
        },
    }
    inventory = {"all": {"children": {"appliance": {"hosts": hosts, "vars": group_vars}}}}
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (work / "settings.yml").write_text(yaml.safe_dump(settings))
    defaults = [
        str(ROLES / r / "defaults/main.yml")
        for r in ("appliance", "ray_cluster", "firewall", "nvidia_driver", "monitoring")
    ]
    tasks = [
        {
            "name": f"Render {name}",
            "ansible.builtin.template": {
                "src": str(ROLES / src),
                "dest": f"{out}/{{{{ inventory_hostname }}}}/{name}",
                "mode": "0644",
            },
        }
        for name, src in TEMPLATES.items()
    ]
    play = [
        {
            "name": "Render the role templates",
            "hosts": "appliance",
            "gather_facts": False,
            "vars_files": defaults,
            "tasks": [
                {
                    "name": "Create the output directory",
                    "ansible.builtin.file": {
                        "path": f"{out}/{{{{ inventory_hostname }}}}",
                        "state": "directory",
                        "mode": "0755",
                    },
                },
                *tasks,
                {
                    "name": "Write the renderer's GPU host arguments",
                    "ansible.builtin.copy": {
                        "content": "{{ monitoring_gpu_host_args | to_json }}",
                        "dest": f"{out}/{{{{ inventory_hostname }}}}/gpu-host-args.json",
                        "mode": "0644",
                    },
                },
            ],
        }
    ]
    (work / "render.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bindir / "ansible-playbook"), "-i", str(work / "inventory.yml"),
         "-e", f"@{work / 'settings.yml'}", str(work / "render.yml")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_FILTER_PLUGINS": str(PLAYBOOKS / "filter_plugins"),
             "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "ANSIBLE_NOCOLOR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def test_appliance_toml_is_valid_for_the_appliance(rendered: Path) -> None:
    data = tomllib.loads((rendered / "gpu02/appliance.toml").read_text())
    config = ApplianceConfig.model_validate(data)
    assert config.ray.address == "10.0.0.11:6379"  # every host points at the head
    assert config.serve.health_check_period_s == 5
    assert config.gateway.request_timeout_s == 300.0
    assert config.store.root == Path("/srv/appliance/models")
    assert ("tls_cert" in data["gateway"]) is TLS


def test_ray_units_for_head_and_worker(rendered: Path) -> None:
    head = (rendered / "gpu01/appliance-ray.service").read_text()
    worker = (rendered / "gpu02/appliance-ray.service").read_text()
    assert "Description=Ray head node" in head and "--head --port=6379" in head
    assert "--address" not in head
    assert "--address=10.0.0.11:6379" in worker and "--head" not in worker
    assert "--node-ip-address=10.0.0.12" in worker
    for unit in (head, worker):
        assert "--min-worker-port=10002 --max-worker-port=10999" in unit
        assert "Restart=always" in unit and "StartLimitIntervalSec=0" in unit
        assert "Environment=RAY_AUTH_MODE=token" in unit
        assert "Environment=RAY_AUTH_TOKEN_PATH=/var/lib/appliance/ray-auth-token" in unit
        assert "User=appliance" in unit
        # systemd joins the continued lines: no line may end without its backslash.
        exec_lines = unit.split("ExecStart=", 1)[1].split("ExecStop=")[0].strip().splitlines()
        assert all(line.endswith("\\") for line in exec_lines[:-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="nft --check needs root (CAP_NET_ADMIN)")
@pytest.mark.parametrize("host", ["gpu01", "gpu02"])
def test_firewall_rules_pass_nft_check(rendered: Path, host: str) -> None:
    require_tools("nft")
    proc = subprocess.run(
        ["nft", "--check", "--file", str(rendered / host / "firewall.nft")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_firewall_opens_the_gateway_on_the_head_only(rendered: Path) -> None:
    head = (rendered / "gpu01/firewall.nft").read_text()
    worker = (rendered / "gpu02/firewall.nft").read_text()
    assert 'tcp dport 443 accept comment "the gateway"' in head
    assert "dport 443" not in worker
    for rules in (head, worker):
        assert "policy drop;" in rules
        assert "elements = { 10.0.0.11, 10.0.0.12 }" in rules
        assert "elements = { 10.0.0.0/24, 192.168.10.5 }" in rules
        assert "ip saddr @admin tcp dport 22 accept" in rules
        ray = "6379-6381, 8076-8077, 10001-10999, 52365-52366, 32768-60999, 9400"
        assert f"ip saddr @cluster tcp dport {{ {ray} }}" in rules
        assert "tcp dport { 9100 } accept" in rules
        assert rules.index("delete table inet appliance") < rules.index("table inet appliance {")


def test_grafana_is_provisioned_with_the_dashboards_datasource(rendered: Path) -> None:
    sources = yaml.safe_load((rendered / "gpu01/grafana-datasources.yaml").read_text())
    [source] = sources["datasources"]
    dashboards = ROLES / "monitoring/files/dashboards"
    # The uid every panel of every shipped dashboard names.
    uids = {
        target["datasource"]["uid"]
        for path in dashboards.glob("*.json")
        for panel in yaml.safe_load(path.read_text())["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    [provider] = yaml.safe_load((rendered / "gpu01/grafana-dashboards.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/appliance"
    server = (rendered / "gpu01/grafana-server.conf").read_text()
    assert "Environment=GF_SERVER_HTTP_ADDR=127.0.0.1" in server
    assert "Environment=GF_ANALYTICS_REPORTING_ENABLED=false" in server


def test_prometheus_scrapes_the_dcgm_exporter_of_every_gpu_host(rendered: Path) -> None:
    args = json.loads((rendered / "gpu01/gpu-host-args.json").read_text())
    assert args == ["--gpu-host", "gpu01=10.0.0.11"]  # gpu02 has no GPU: no exporter there


def test_the_dcgm_exporter_unit_runs_nvidias_image_on_every_gpu(rendered: Path) -> None:
    unit = (rendered / "gpu02/appliance-dcgm-exporter.service").read_text()
    [start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert start.startswith("ExecStart=/usr/bin/docker run --rm --name appliance-dcgm-exporter")
    assert "--gpus all" in start and "-p 9400:9400" in start
    assert start.endswith("nvcr.io/nvidia/k8s/dcgm-exporter:4.2.0-4.1.0-ubuntu22.04")
    assert "Restart=always" in unit and "Requires=docker.service" in unit


def test_nvidia_packages_are_pinned_and_blacklisted(rendered: Path) -> None:
    pin = (rendered / "gpu01/nvidia-pin.pref").read_text()
    assert "Package: nvidia-fabricmanager-580\nPin: version 580.95.05-*\nPin-Priority: 1001" in pin
    assert pin.count("Pin-Priority: 1001") == 4
    unattended = (rendered / "gpu01/51appliance-nvidia").read_text()
    assert '    "libnvidia-nscq-580";' in unattended
    sources = (rendered / "gpu01/nvidia-cuda.sources").read_text()
    assert "URIs: https://mirror.example.com/cuda/ubuntu2204/x86_64/\nSuites: /\n" in sources
