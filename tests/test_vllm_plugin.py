"""The vLLM plugin (appliance/vllm_plugin.py), loaded through its entry point as vLLM loads
it, against a real placement group on a local Ray with declared GPUs; where vLLM's CPU
build is installed, vLLM's own `initialize_ray_cluster` takes the group.

The group checks run in tests/vllm_plugin_probe.py, a process of its own: the plugin
changes `ray.util` for its whole process.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import ray

from appliance import vllm_plugin
from appliance.config import EnginesConfig
from appliance.control import PLACEMENT_GROUP_ENV
from appliance.engines.cpuenv import CpuEngineEnv
from tests.conftest import REPO_ROOT, entry_points_dist


def _probe(python: str, path: list[Path], tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in (PLACEMENT_GROUP_ENV, "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, path))
    # A token of the test's own (Ray's default writes one per user, ~/.ray/auth_token).
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    done = subprocess.run(
        [python, "-m", "tests.vllm_plugin_probe"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return dict(json.loads(line))


def _check_group(out: dict[str, Any]) -> None:
    assert out["before"] is None  # a process the replica starts is in no group of its own
    assert "appliance_placement_group" in out["plugins"]
    assert out["current"] == out["created"]
    assert out["bundle_specs"] == [{"CPU": 1.0, "GPU": 1.0}] + [{"GPU": 1.0}] * 3
    assert "is REMOVED" in out["removed"] and out["created"] in out["removed"]


def test_the_entry_point_vllm_loads_is_the_plugin(tmp_path: Path) -> None:
    sys.path.insert(0, str(entry_points_dist(tmp_path)))
    try:
        found = [p for p in entry_points(group="vllm.general_plugins") if p.dist is not None]
        ours = [p for p in found if p.value == "appliance.vllm_plugin:register"]
        assert ours, [p.value for p in found]
        assert ours[0].load() is vllm_plugin.register
    finally:
        sys.path.remove(str(tmp_path / "entry-points"))


def test_without_a_group_the_plugin_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PLACEMENT_GROUP_ENV, raising=False)
    before = ray.util.get_current_placement_group
    vllm_plugin.register()
    assert ray.util.get_current_placement_group is before


def test_a_malformed_group_id_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLACEMENT_GROUP_ENV, "not-hex")
    before = ray.util.get_current_placement_group
    with pytest.raises(vllm_plugin.GroupGone, match="'not-hex' is not a placement group id"):
        vllm_plugin.register()
    assert ray.util.get_current_placement_group is before


def test_the_plugin_hands_vllm_the_replicas_group_and_ranks_stay_per_node(
    tmp_path: Path,
) -> None:
    out = _probe(sys.executable, [entry_points_dist(tmp_path), REPO_ROOT], tmp_path)
    _check_group(out)
    # One node: every rank there, in bundle order, stage = rank // TP.
    layout = out["layout"]
    assert [(r["rank"], r["stage"], r["bundle"]) for r in layout] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 2),
        (3, 1, 3),
    ]
    assert len({r["node_id"] for r in layout}) == 1
    assert "a tensor-parallel group of 3 would span nodes" in out["split"]


def _lent_ray(tmp_path: Path) -> Path:
    """The CPU build's environment has no Ray (CPU plans never span nodes): lend it the
    appliance's own (2.60.0, the release the engine image pins) and the one module Ray
    needs that vLLM's environment lacks."""
    import msgpack

    lent = tmp_path / "lent"
    lent.mkdir()
    for module in (ray, msgpack):
        (lent / module.__name__).symlink_to(Path(module.__file__ or "").parent)
    return lent


def test_real_vllm_initialize_ray_cluster_takes_the_replicas_group(tmp_path: Path) -> None:
    engine = CpuEngineEnv.of(EnginesConfig())
    if not engine.ready:
        pytest.skip(f"vLLM's CPU build is not installed at {engine.root}")
    path = [entry_points_dist(tmp_path), REPO_ROOT, _lent_ray(tmp_path)]
    out = _probe(str(engine.python), path, tmp_path)
    _check_group(out)
    # vLLM's ParallelConfig.placement_group after initialize_ray_cluster: the group made
    # for the replica, not one vLLM created; its bundle functions see the ranks' bundles.
    assert out["vllm"]["group"] == out["created"]
    assert out["vllm"]["sorted_by_node"] == [0, 1, 2, 3]
    assert out["vllm"]["for_indices"] == [0, 1, 2, 3]
