"""A real Prometheus (Debian's package) for tests: started on a free loopback port with a
given configuration, stopped by its pid; and instant queries against its HTTP API."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port, wait_http
from tests.installer.testhosts import require_tools


@contextmanager
def running_prometheus(config: Path, root: Path) -> Iterator[str]:
    """Its base URL; installs the package when missing (or skips the test, saying why)."""
    require_tools("prometheus")
    port = free_port()
    with (root / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=60, proc=proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def promql(url: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    return list(resp["data"]["result"])
