"""The image definitions agree with the code that runs them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from appliance import versions
from appliance.config import EnginesConfig
from appliance.engines import get_adapter

IMAGES = Path(__file__).parent.parent / "images"
BUILD = IMAGES / "build.sh"


def _containerfile(name: str) -> str:
    return (IMAGES / name / "Containerfile").read_text()


@pytest.mark.parametrize("name", ["control-plane", "vllm", "trtllm"])
def test_bases_are_pinned_and_images_labelled_and_checked(name: str) -> None:
    text = _containerfile(name)
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)
    assert bases, "the base image is a build argument with a default"
    for base in bases:
        tag = base.rsplit(":", 1)[-1]
        assert ":" in base and tag != "latest" and re.search(r"\d", tag), base
    assert "io.appliance.component=" in text
    assert re.search(r"^HEALTHCHECK ", text, re.M)


@pytest.mark.parametrize("engine", ["vllm", "trtllm"])
def test_engine_labels_match_the_adapter(engine: str) -> None:
    text = _containerfile(engine)
    adapter = get_adapter(engine)
    assert f'io.appliance.engine="{engine}"' in text
    assert f'io.appliance.engine.metrics="{adapter.metrics_path}"' in text
    assert 'io.appliance.engine.health="/health"' in text
    entrypoint = (
        '["python3", "-m", "vllm.entrypoints.openai.api_server"]'
        if engine == "vllm"
        else '["trtllm-serve"]'
    )
    assert f"ENTRYPOINT {entrypoint}" in text


def test_build_script_tags_are_the_configured_images() -> None:
    script = BUILD.read_text()
    defaults = EnginesConfig()
    # The script's own tag function, run: the tags come out as the configured images.
    for engine in ("vllm", "trtllm"):
        image = defaults.of(engine).image
        start, end = script.index("pin() {"), script.index("for image in")
        tag = subprocess.run(
            ["bash", "-c", f"root={IMAGES.parent}\n{script[start:end]}\ntag_of {engine}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert tag == image
    # The engine version in a tag is the version its Containerfile pins: appliance.versions,
    # which the script reads and passes on.
    vllm = _containerfile("vllm")
    assert f"ARG VLLM_VERSION={versions.VLLM}\n" in vllm
    assert f"vllm-openai:v{versions.VLLM}\n" in vllm
    assert f"release:{versions.TRTLLM}" in _containerfile("trtllm")
    assert "appliance/versions.py" in script and "0.32" not in script


def test_build_script_is_valid_and_explains_a_missing_engine() -> None:
    assert subprocess.run(["bash", "-n", str(BUILD)]).returncode == 0
    usage = subprocess.run(["bash", str(BUILD), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--save DIR" in usage.stdout
    missing = subprocess.run(
        ["bash", str(BUILD), "--cli", "no-such-container-cli", "vllm"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    assert "cannot reach a container engine" in missing.stderr


def test_the_vllm_image_carries_the_plugin_and_the_clusters_ray() -> None:
    import tomllib

    vllm = _containerfile("vllm")
    # The appliance's wheel without its dependencies: vLLM finds the plugin's entry point.
    assert "pip install --no-cache-dir --no-deps /tmp/appliance-*.whl" in vllm
    deps = tomllib.loads((IMAGES.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in deps if d.startswith("ray[")]
    assert f"ARG RAY_VERSION={pin}\n" in vllm
    assert '"ray[cgraph]==${RAY_VERSION}"' in vllm
    assert "RAY_VERSION=$ray_version" in BUILD.read_text()
