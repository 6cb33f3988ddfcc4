"""Provider credentials: read from the environment or a file only its owner can read.

A `Secret` never shows its value in repr, str, logs or tracebacks; only `reveal()` (the
client, when it builds the request headers) returns it. Errors name the variable or the
file, never the content.
"""

from __future__ import annotations

import configparser
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.burst.settings import ProviderConfig
from appliance.errors import ConfigError


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not to be pickled")


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: Secret
    session_token: Secret | None

    def __repr__(self) -> str:
        return f"AwsCredentials(access_key_id={self.access_key_id[:4]}***)"


def _private_file(path: Path, provider: str) -> str:
    try:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            mode = stat.S_IMODE(info.st_mode)
            raise ConfigError(
                f"burst provider {provider!r}: {path} is readable by others (mode {mode:04o})",
                hint=f"Make it private to the appliance's user: `chmod 600 {path}`.",
            )
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"burst provider {provider!r}: cannot read {path}: {exc.strerror}",
            hint="Check the path and that the appliance's user owns the file.",
        ) from None


def api_key(name: str, config: ProviderConfig) -> Secret | None:
    """The provider's API key; None for an openai_compatible server that takes none."""
    if config.api_key_file is not None:
        value = _private_file(config.api_key_file, name)
        where = str(config.api_key_file)
    elif config.api_key_env is not None:
        value = os.environ.get(config.api_key_env, "").strip()
        where = f"${config.api_key_env}"
    else:
        return None
    if not value:
        raise ConfigError(
            f"burst provider {name!r}: {where} is empty or unset",
            hint="Put the provider's API key there (it is read when the gateway starts).",
        )
    return Secret(value)


def aws_credentials(name: str, config: ProviderConfig) -> AwsCredentials:
    if config.aws_credentials_file is not None:
        text = _private_file(config.aws_credentials_file, name)
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text)
        except configparser.Error:
            raise ConfigError(
                f"burst provider {name!r}: {config.aws_credentials_file} is not an AWS "
                "credentials file",
                hint="Write it as [default] with aws_access_key_id and aws_secret_access_key.",
            ) from None
        section = dict(parser[config.aws_profile]) if parser.has_section(config.aws_profile) else {}
        where = f"[{config.aws_profile}] of {config.aws_credentials_file}"
        key_id = section.get("aws_access_key_id", "")
        secret = section.get("aws_secret_access_key", "")
        token = section.get("aws_session_token")
    else:
        where = "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        key_id = os.environ.get("AWS_ACCESS_KEY_ID", "")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        token = os.environ.get("AWS_SESSION_TOKEN")
    if not key_id or not secret:
        raise ConfigError(
            f"burst provider {name!r}: no AWS access key id and secret access key in {where}",
            hint="Set aws_credentials_file to a 0600 credentials file, or export the AWS_* "
            "variables for the gateway.",
        )
    return AwsCredentials(key_id, Secret(secret), Secret(token) if token else None)
