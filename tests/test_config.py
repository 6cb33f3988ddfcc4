from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from appliance import config as config_module
from appliance.config import ApplianceConfig, find_config, load_config
from appliance.errors import ApplianceError, ConfigError


@pytest.fixture
def home(appliance_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # /etc/appliance/appliance.toml on the host running the tests must not leak in.
    monkeypatch.setattr(config_module, "SEARCH_PATHS", (Path("appliance.toml"),))
    return appliance_home


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(text: str) -> tuple[Path, str]:
    path = write(Path("appliance.toml"), text)
    with pytest.raises(ConfigError) as info:
        load_config()
    return path, str(info.value)


def test_no_file_is_the_embedded_default(home: Path) -> None:
    config = load_config()

    assert config.is_embedded_default
    assert config.source is None
    assert find_config() is None
    assert config.home_dir == home
    assert config.store_dir == home / "models"
    assert config.state_db == home / "state.db"
    assert config.run_dir == home / "run"
    assert config.log_dir == home / "logs"
    assert config.gateway.port == 8000
    assert config.gateway.host == "127.0.0.1"
    assert config.ray.address is None


def test_home_defaults_to_the_user_data_dir(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_HOME")
    expected = Path(platformdirs.user_data_dir("appliance", appauthor=False))
    assert load_config().home_dir == expected


def test_appliance_toml_in_the_working_directory_is_found(home: Path) -> None:
    path = write(Path("appliance.toml"), "[gateway]\nport = 9001\n")

    config = load_config()

    assert not config.is_embedded_default
    assert config.source == path
    assert config.gateway.port == 9001


def test_environment_variable_names_the_file(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "elsewhere.toml", "[gateway]\nport = 9002\n")
    write(Path("appliance.toml"), "[gateway]\nport = 9003\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))

    config = load_config()

    assert config.source == path
    assert config.gateway.port == 9002


def test_environment_variable_naming_a_missing_file_is_an_error(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv("APPLIANCE_CONFIG", str(missing))

    with pytest.raises(ConfigError) as info:
        load_config()

    assert str(missing) in info.value.message
    assert "APPLIANCE_CONFIG" in info.value.message
    assert info.value.hint


def test_explicit_missing_file_is_an_error(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in info.value.message
    assert "--config" in (info.value.hint or "")


def test_explicit_file_wins_over_the_environment(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = write(tmp_path / "explicit.toml", "[gateway]\nport = 9004\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "missing.toml"))
    assert load_config(explicit).gateway.port == 9004


def test_unknown_top_level_key_names_file_and_field(home: Path) -> None:
    path, message = config_error('hoem = "/srv"\n')
    assert message.startswith(f"{path}: ")
    assert "hoem: unknown key" in message


def test_unknown_nested_key_names_file_and_dotted_field(home: Path) -> None:
    path, message = config_error("[gateway]\nprot = 1\n")
    assert str(path) in message
    assert "gateway.prot: unknown key" in message


def test_errors_name_the_file_the_environment_points_at(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "site.toml", "[ray]\nnum_cpus = 0\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value).startswith(f"{path}: ")
    assert "ray.num_cpus" in str(info.value)


def test_every_problem_is_reported_at_once(home: Path) -> None:
    _, message = config_error("[gateway]\nprot = 1\n[serve]\nhealth_check_period_s = -1\n")
    assert "gateway.prot" in message
    assert "serve.health_check_period_s" in message


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_out_of_bounds_port_names_the_field(home: Path, port: int) -> None:
    path, message = config_error(f"[gateway]\nport = {port}\n")
    assert str(path) in message
    assert "gateway.port" in message


def test_wrong_type_names_the_field(home: Path) -> None:
    _, message = config_error('[gateway]\nport = "eighty"\n')
    assert "gateway.port" in message


def test_invalid_toml_names_the_file(home: Path) -> None:
    path, message = config_error("[gateway\nport = 1\n")
    assert str(path) in message
    assert "not valid TOML" in message


def test_file_that_is_not_utf8_is_a_config_error(home: Path) -> None:
    Path("appliance.toml").write_bytes(b"[gateway]\nhost = '\xff\xfe'\n")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "appliance.toml" in str(info.value)


def test_config_errors_are_appliance_errors() -> None:
    assert issubclass(ConfigError, ApplianceError)


def test_valid_file_overrides_are_honoured(home: Path, tmp_path: Path) -> None:
    text = f"""
home = "{tmp_path / "state"}"
catalog = "{tmp_path / "models.toml"}"

[gateway]
host = "0.0.0.0"
allow_insecure_http = true
port = 8443
require_api_key = false
retry_after_s = 30

[store]
root = "{tmp_path / "store"}"

[ray]
address = "auto"
num_gpus = 0

[serve]
health_check_period_s = 5.0
"""
    write(Path("appliance.toml"), text)

    config = load_config()

    assert config.home_dir == tmp_path / "state"  # wins over $APPLIANCE_HOME
    assert config.state_db == tmp_path / "state" / "state.db"
    assert config.log_dir == tmp_path / "state" / "logs"
    assert config.store_dir == tmp_path / "store"
    assert config.catalog == tmp_path / "models.toml"
    assert config.gateway.host == "0.0.0.0"
    assert config.gateway.port == 8443
    assert config.gateway.require_api_key is False
    assert config.gateway.retry_after_s == 30
    assert config.ray.address == "auto"
    assert config.ray.num_gpus == 0
    assert config.serve.health_check_period_s == 5.0
    # Fields the file leaves out keep their defaults.
    assert config.gateway.request_timeout_s == ApplianceConfig().gateway.request_timeout_s


def test_source_is_not_part_of_the_dumped_configuration(home: Path) -> None:
    write(Path("appliance.toml"), "[gateway]\nport = 9005\n")
    assert "source" not in load_config().model_dump()


def test_configuration_is_immutable() -> None:
    config = ApplianceConfig()
    with pytest.raises(ValueError):
        config.gateway.port = 1  # type: ignore[misc]


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "appliance.toml"
    path.write_text(
        'home = "state"\ncatalog = "models.toml"\n[store]\nroot = "../models"\nwheels = "wheels"\n'
    )
    config = load_config(path)
    assert config.home_dir == etc / "state"
    assert config.catalog == etc / "models.toml"
    assert config.store_dir == etc / "../models"
    assert config.store.wheels == etc / "wheels"
    assert ApplianceConfig().store.wheels is None  # the embedded default: the package index


def test_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('[gateway]\ntls_cert = "gateway.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "tls_cert and tls_key go together" in info.value.message
    path.write_text('[gateway]\ntls_cert = "gateway.pem"\ntls_key = "gateway.key"\n')
    config = load_config(path)
    assert config.gateway.tls_cert == tmp_path / "gateway.pem"
    assert config.gateway.scheme == "https"


@pytest.mark.parametrize(
    ("line", "field", "hint"),
    [
        ('require_api_key = "no"', "gateway.require_api_key", "write true or false"),
        ('require_api_key = "off"', "gateway.require_api_key", "write true or false"),
        ("require_api_key = 0", "gateway.require_api_key", "valid boolean"),
        ('port = "8001"', "gateway.port", "write the number without quotes"),
        ("port = 8001.0", "gateway.port", "valid integer"),
        ("port = true", "gateway.port", "valid integer"),
        ('retry_after_s = "5"', "gateway.retry_after_s", "without quotes"),
    ],
)
def test_booleans_and_numbers_are_strict(home: Path, line: str, field: str, hint: str) -> None:
    _, message = config_error(f"[gateway]\n{line}\n")
    assert f"{field}:" in message
    assert hint in message


@pytest.mark.parametrize(
    ("text", "where", "suggestion"),
    [
        ("[gateway]\nhots = 'x'\n", "gateway.hots", "host"),
        ("[gateway]\nrequire_api_keys = true\n", "gateway.require_api_keys", "require_api_key"),
        (
            "[gateway.limits]\nmax_body_byte = 5000\n",
            "gateway.limits.max_body_byte",
            "max_body_bytes",
        ),
        ("[gatway]\nport = 1\n", "gatway", "gateway"),
        (
            "[serve]\nhealth_check_perod_s = 2.0\n",
            "serve.health_check_perod_s",
            "health_check_period_s",
        ),
        ("[models.x]\nengine_arg = []\n", "models.x.engine_arg", "engine_args"),
        ("[install]\nbecom = true\n", "install.becom", "become"),
    ],
)
def test_unknown_keys_get_did_you_mean(home: Path, text: str, where: str, suggestion: str) -> None:
    _, message = config_error(text)
    assert f"{where}: unknown key; did you mean '{suggestion}'?" in message


def test_an_unknown_key_with_no_near_name_gets_no_guess(home: Path) -> None:
    _, message = config_error("[gateway]\nzzzzzz = 1\n")
    assert "gateway.zzzzzz: unknown key" in message
    assert "did you mean" not in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example.com"])
def test_plain_http_beyond_loopback_is_refused(home: Path, host: str) -> None:
    _, message = config_error(f'[gateway]\nhost = "{host}"\n')
    assert "no TLS is set" in message
    assert "allow_insecure_http = true" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_plain_http_on_loopback_is_fine(home: Path, host: str) -> None:
    write(Path("appliance.toml"), f'[gateway]\nhost = "{host}"\n')
    assert load_config().gateway.is_loopback


def test_insecure_http_can_be_allowed_on_purpose(home: Path) -> None:
    write(Path("appliance.toml"), '[gateway]\nhost = "0.0.0.0"\nallow_insecure_http = true\n')
    config = load_config()
    assert config.gateway.host == "0.0.0.0" and config.gateway.scheme == "http"


def test_gateway_limits_have_bounds(home: Path) -> None:
    _, message = config_error("[gateway.limits]\nmax_body_bytes = 10\n")
    assert "gateway.limits.max_body_bytes" in message
