"""Files people write: one strict base, one reader, one way of telling what is wrong.

Each source (appliance.toml, models.toml, cost inputs, an install file) gets a typo'd key and
must name the file, the table and the key, with the key it meant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from appliance import catalog, config, cost, strict
from appliance.burst import settings as burst_settings
from appliance.errors import ApplianceError, CatalogError, ConfigError, CostError, InstallError
from appliance.installer import inventory
from appliance.installer import settings as install_settings
from tests.test_catalog import VALID as TOY


def _cost(path: Path) -> object:
    return cost.load_inputs(path, {}, {})


SOURCES: list[tuple[str, str, Callable[[Path], object], type[ApplianceError], str]] = [
    (
        "appliance.toml",
        "[gateway]\nprot = 8001\n",
        config.load_config,
        ConfigError,
        "gateway.prot: unknown key; did you mean 'port'?",
    ),
    (
        "appliance.toml",
        '[install]\n[[install.hosts]]\nname = "gpu01"\nadress = "10.0.0.11"\n',
        config.load_config,
        ConfigError,
        "install.hosts.0.adress: unknown key; did you mean 'address'?",
    ),
    (
        "models.toml",
        TOY.replace("num_kv_heads", "num_kv_head", 1),
        catalog.load_catalog,
        CatalogError,
        "toy.architecture.num_kv_head: unknown key; did you mean 'num_kv_heads'?",
    ),
    (
        "cost.toml",
        "utilisation = 0.4\n",
        _cost,
        CostError,
        "utilisation: unknown key; did you mean 'utilization'?",
    ),
    (
        "install.toml",
        '[[hosts]]\nname = "gpu01"\nprot = 2222\n',
        inventory.load_install_toml,
        InstallError,
        "install.hosts.0.prot: unknown key; did you mean 'port'?",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "load", "error", "expected"), SOURCES, ids=[s[4] for s in SOURCES]
)
def test_a_typo_is_reported_with_the_file_the_table_and_the_key(
    tmp_path: Path,
    name: str,
    text: str,
    load: Callable[[Path], object],
    error: type[ApplianceError],
    expected: str,
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(error) as info:
        load(path)
    assert any(line.startswith(f"{path}: {expected}") for line in info.value.message.splitlines())


def test_quoted_numbers_are_errors_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "cost.toml"
    path.write_text('nodes = "3"\n')
    with pytest.raises(CostError) as info:
        cost.load_inputs(path, {}, {})
    assert "nodes: Input should be a valid integer; got the string '3'" in info.value.message
    assert "write the number without quotes" in info.value.message


def test_a_flag_is_named_as_the_person_wrote_it(tmp_path: Path) -> None:
    path = tmp_path / "cost.toml"
    path.write_text("nodes = 0\n")
    with pytest.raises(CostError) as info:
        cost.load_inputs(path, {"utilization": 7.0}, {"utilization": "--utilization"})
    lines = info.value.message.splitlines()
    assert "--utilization: Input should be less than or equal to 1" in lines
    assert f"{path}: nodes: Input should be greater than or equal to 1" in lines


def test_keys_offered_follow_tagged_unions_and_skip_the_table_key(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    # pydantic's location holds the union's tag ('hub'); the file has no such key.
    path.write_text(TOY.replace('{ repo = "org/toy" }', '{ repo = "org/toy", branch = "x" }'))
    assert "toy.sources.bf16.branch: unknown key (allowed: repo, revision)" in _catalog_error(path)
    path.write_text(TOY + "\n[toy.foo]\nbar = 1\n")
    message = _catalog_error(path)
    assert "toy.foo: unknown key (allowed: display_name, description," in message
    allowed = message.partition("allowed: ")[2].partition(")")[0].split(", ")
    assert "name" not in allowed  # the table key is not written in the table


def _catalog_error(path: Path) -> str:
    with pytest.raises(CatalogError) as info:
        catalog.load_catalog(path)
    return info.value.message


def test_every_file_model_has_the_one_strict_base() -> None:
    def models(module: object) -> list[type[BaseModel]]:
        return [
            v
            for v in vars(module).values()
            if isinstance(v, type)
            and issubclass(v, BaseModel)
            and v.__module__ == getattr(module, "__name__", "")
        ]

    found = [m for module in (config, catalog, cost, install_settings) for m in models(module)]
    assert len(found) > 10
    assert all(issubclass(m, strict.Strict) for m in found), [
        m.__name__ for m in found if not issubclass(m, strict.Strict)
    ]
    # burst's settings are a section of appliance.toml with their own base (not yet merged).
    assert burst_settings.BurstConfig.model_config.get("extra") == "forbid"


def test_read_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    with pytest.raises(ConfigError, match=f"{path}: no such thing"):
        strict.read_toml(path, ConfigError, "thing")
    path.write_text("a = [\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        strict.read_toml(path, ConfigError, "thing")
