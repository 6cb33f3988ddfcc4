"""doctor --local: the ports the appliance running here holds are its own, not another
service's; --json's status agrees with the exit code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.control.records import StatusFile
from appliance.control.runtime import is_supervisor, write_status
from appliance.installer.localports import listening_ports
from tests.installer.test_install_cli import cli

# A stand-in supervisor: its own session, its argv names the module, it listens on a port
# and keeps a client connection open (which must not count as listening).
STAND_IN = """
import socket, sys, time
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 0)); v6.listen()
client = socket.create_connection(server.getsockname())
print(server.getsockname()[1], v6.getsockname()[1], client.getsockname()[1], flush=True)
time.sleep(120)
"""


@pytest.fixture
def listener() -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, "appliance.control.supervisor"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ports = [int(p) for p in proc.stdout.readline().split()]
        deadline = time.monotonic() + 10
        while not is_supervisor(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield proc, ports
    finally:
        proc.kill()
        proc.wait()


def test_listening_ports_of_a_process(listener: tuple[subprocess.Popen[str], list[int]]) -> None:
    proc, (port, port6, client) = listener
    found = listening_ports([proc.pid])
    assert {port, port6} <= found
    assert client not in found
    assert listening_ports([]) == set()
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        assert mine.getsockname()[1] not in listening_ports([proc.pid])


def test_doctor_local_passes_the_running_appliances_ports(
    tmp_path: Path, listener: tuple[subprocess.Popen[str], list[int]]
) -> None:
    proc, (port, port6, _) = listener
    home = tmp_path / "home"
    write_status(ApplianceConfig(home=home), StatusFile(pid=proc.pid, phase="running"))
    cli(home, "doctor", "--local", "--json", cwd=tmp_path)
    (run,) = (home / "installs").iterdir()
    extravars = json.loads((run / "env" / "extravars").read_text())
    assert {port, port6} <= set(extravars["preflight_own_ports"])


def test_doctor_local_json_status_agrees_with_the_exit_code(tmp_path: Path) -> None:
    proc = cli(tmp_path / "home", "doctor", "--local", "--json", cwd=tmp_path)
    report = json.loads(proc.stdout)
    failed = any(f["status"] == "fail" for f in report["findings"]["localhost"])
    assert proc.returncode == (1 if failed else 0)
    assert report["status"] == ("failed" if failed else "successful")
    assert report["ansible_status"] == "successful"  # the role only reports
