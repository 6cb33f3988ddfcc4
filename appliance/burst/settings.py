"""The `[burst]` section of appliance.toml: cloud providers, triggers, policy, breaker.

Plain pydantic, importable from appliance.config without a cycle (like the install
section). Off by default. Credentials are never in the file: a provider names the
environment variable or the 0600 file that holds them (`credentials.py` reads them).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

FilePath = Annotated[Path, Strict(False)]
ProviderType = Literal["openai", "azure_openai", "anthropic", "bedrock", "openai_compatible"]
LeavingClass = Literal["public", "internal", "confidential"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
# Where each type answers when `endpoint` is not set; azure_openai and openai_compatible
# have no default (the resource or the server is yours).
DEFAULT_ENDPOINTS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
BEDROCK_EXTRA = "pip install 'appliance[bedrock]'"


class _Section(BaseModel):
    # Strict like the rest of appliance.toml: `enabled = "yes"` is an error, not True.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RemoteModel(_Section):
    """What a local model is called at a provider, and what its tokens cost there."""

    model: str = Field(
        min_length=1,
        description="The provider's name for it: a model id (OpenAI, Anthropic, Bedrock's "
        "model or inference-profile id) or an Azure deployment name.",
    )
    input_per_million: float = Field(
        ge=0, description="Price of a million prompt tokens at this provider (required)."
    )
    output_per_million: float = Field(
        ge=0, description="Price of a million completion tokens at this provider (required)."
    )
    images: bool = Field(
        False,
        description="The provider's model reads image parts. A request with images for a "
        "local model whose catalog entry reads text only can then overflow here (and only "
        "here); otherwise it is refused with 400.",
    )


class ProviderConfig(_Section):
    type: ProviderType = Field(description="Which wire format the provider speaks.")
    endpoint: str | None = Field(
        None,
        description="Base URL. Default: https://api.openai.com/v1 (openai), "
        "https://api.anthropic.com (anthropic), https://bedrock-runtime.<region>.amazonaws.com "
        "(bedrock); required for azure_openai (https://<resource>.openai.azure.com) and "
        "openai_compatible (the URL that /chat/completions is under).",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (not the key itself)."
    )
    api_key_file: FilePath | None = Field(
        None, description="File holding the API key; must not be readable by group or others."
    )
    region: str | None = Field(None, description="bedrock: the AWS region (required).")
    aws_credentials_file: FilePath | None = Field(
        None,
        description="bedrock: an AWS shared-credentials file (INI: aws_access_key_id, "
        "aws_secret_access_key, optional aws_session_token), not readable by group or "
        "others. Unset: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN "
        "from the environment.",
    )
    aws_profile: str = Field("default", description="bedrock: the section of that file.")
    api_version: str = Field(
        "2024-10-21", description="azure_openai: the api-version query parameter."
    )
    anthropic_version: str = Field(
        "2023-06-01", description="anthropic: the anthropic-version header."
    )
    default_max_tokens: int = Field(
        4096,
        ge=1,
        le=1_048_576,
        description="anthropic and bedrock require max_tokens: sent when the client gave none.",
    )
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="Time to connect.")
    read_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest the provider may stay silent in one answer."
    )
    unsupported_params: list[str] = Field(
        default_factory=list,
        description="openai_compatible and azure_openai: request fields this endpoint cannot "
        "honour (e.g. 'logit_bias', 'n', 'response_format.json_schema'); a request with one "
        "gets a 400 naming it instead of reaching the provider.",
    )
    models: dict[str, RemoteModel] = Field(
        default_factory=dict,
        description="Local model name -> the provider's model and its prices. A model not "
        "listed never goes to this provider.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "give the name of an environment variable (letters, digits, '_'), not the "
                "key itself"
            )
        return value

    @model_validator(mode="after")
    def _shape(self) -> ProviderConfig:
        key = self.api_key_env is not None or self.api_key_file is not None
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("set api_key_env or api_key_file, not both")
        if self.type == "bedrock":
            if key:
                raise ValueError(
                    "bedrock signs requests with AWS credentials: use aws_credentials_file "
                    "(or the AWS_* environment variables), not api_key_env/api_key_file"
                )
            if self.region is None or not _REGION.fullmatch(self.region):
                raise ValueError("bedrock needs region, such as 'us-east-1'")
            if importlib.util.find_spec("botocore") is None:
                raise ValueError(f"bedrock needs botocore, which is not installed: {BEDROCK_EXTRA}")
        else:
            if self.region is not None or self.aws_credentials_file is not None:
                raise ValueError(
                    f"region and aws_credentials_file are for bedrock, not {self.type}"
                )
            if not key and self.type != "openai_compatible":
                raise ValueError(f"{self.type} needs api_key_env or api_key_file")
        if self.type in ("azure_openai", "openai_compatible") and self.endpoint is None:
            raise ValueError(f"{self.type} needs endpoint")
        if self.endpoint is not None and not self.endpoint.startswith(("https://", "http://")):
            raise ValueError("endpoint must be an http:// or https:// URL")
        return self

    @property
    def base_url(self) -> str:
        if self.endpoint is not None:
            return self.endpoint.rstrip("/")
        if self.type == "bedrock":
            return f"https://bedrock-runtime.{self.region}.amazonaws.com"
        return DEFAULT_ENDPOINTS[self.type]


class TriggerConfig(_Section):
    """When a request overflows (appliance/gateway/overflow.py reads these)."""

    latency_target_ms: int | None = Field(
        None,
        ge=1,
        le=3_600_000,
        description="Overflow when every local slot of the model is taken (or requests wait "
        "for one) and the estimated wait, (requests in line + 1) x the recent wait per place "
        "in line + the recent local time to first token, is above this. Unset: never for "
        "latency.",
    )
    local_unavailable: bool = Field(
        True, description="Overflow when the model has no healthy local replica."
    )
    local_full: bool = Field(
        True,
        description="Overflow when the local line is full or its wait ran out (the request "
        "would get 503 model_overloaded).",
    )
    local_errors: bool = Field(
        False, description="Overflow when the local engine failed before answering (502)."
    )


class PolicyConfig(_Section):
    """What may leave the site, for whom, and how much."""

    data_classes: list[LeavingClass] = Field(
        default_factory=lambda: list[LeavingClass](["public"]),
        description="Keys whose data class is one of these may overflow. `restricted` can "
        "never leave.",
    )
    opt_in_keys: list[str] = Field(
        default_factory=list,
        description='Key names that may overflow (their data class permitting); "*": every '
        "key. Empty: none.",
    )
    monthly_cap: float = Field(
        0.0, ge=0, description="Cloud spend per calendar month (UTC), all keys together."
    )
    key_monthly_cap: float | None = Field(
        None, ge=0, description="Cloud spend per key per month, for keys not in key_caps."
    )
    key_caps: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="Key name -> its own monthly cloud spend cap."
    )
    max_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Largest share of a model's recent requests (a one-minute decaying "
        "count, all gateway workers together) that may overflow.",
    )


class BreakerConfig(_Section):
    """One circuit breaker per provider."""

    errors: int = Field(
        5, ge=1, le=10_000, description="Errors or timeouts within window_s that open it."
    )
    window_s: float = Field(60.0, gt=0, le=86400, description="The window errors count in.")
    cooldown_s: float = Field(
        30.0, gt=0, le=86400, description="Open this long, then one probe request is let through."
    )


class BurstConfig(_Section):
    enabled: bool = Field(False, description="Overflow to cloud providers at all.")
    providers: dict[str, ProviderConfig] = Field(
        default_factory=dict, description="Name -> provider, in order of preference."
    )
    triggers: TriggerConfig = TriggerConfig()
    policy: PolicyConfig = PolicyConfig()
    breaker: BreakerConfig = BreakerConfig()
    latency_alpha: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Weight of the newest sample in each provider's recent latency (EWMA).",
    )

    @model_validator(mode="after")
    def _usable(self) -> BurstConfig:
        if self.enabled and not self.providers:
            raise ValueError("burst is enabled but names no providers")
        if self.enabled and self.policy.monthly_cap == 0:
            raise ValueError(
                "burst is enabled but policy.monthly_cap is 0, so nothing could be spent: "
                "set the monthly cloud spend cap"
            )
        for name in self.providers:
            if not _ENV_NAME.fullmatch(name.replace("-", "_")):
                raise ValueError(f"provider name {name!r}: use letters, digits, '_' and '-'")
        return self
