"""API keys: who may call what, how much, until when.

A key has a *scope* (`user`: inference and the model list; `admin`: also the admin API),
the *models* it may call (every model when unset), *limits* (requests and tokens per
minute, requests at once, and caps on one request's prompt and `max_tokens`), a *data
class* (the most sensitive data it may send; cloud overflow reads it) and an *expiry*.
The key itself is shown once, at creation or rotation; only its SHA-256 digest is kept.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ApplianceError

KEY_PREFIX = "sk-app-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# From least to most sensitive; a key may send data up to its class.
DATA_CLASSES = ("public", "internal", "confidential", "restricted")
DataClass = Literal["public", "internal", "confidential", "restricted"]
Scope = Literal["user", "admin"]


class KeyPolicy(BaseModel):
    """What a key may do; stored with the key as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    scope: Scope = Field("user", description="user: inference; admin: also the admin API.")
    models: tuple[str, ...] | None = Field(
        None, description="Models the key may call; None: every model."
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens (prompt + completion) per minute.")
    concurrency: int | None = Field(None, ge=1, description="Requests in flight at once.")
    max_tokens: int | None = Field(None, ge=1, description="Largest max_tokens of one request.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Largest prompt of one request, in tokens."
    )
    data_class: DataClass = Field("internal", description="Most sensitive data it may send.")
    log_bodies_days: int | None = Field(
        None,
        ge=1,
        le=3650,
        description="Keep this key's prompts and answers for this many days (audited when "
        "set); None: never kept.",
    )
    expires_at: float | None = Field(None, description="Unix time it stops working; None: never.")

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored: its identity, its state and its policy (never the key itself)."""

    id: int
    name: str
    prefix: str
    digest: str
    created_at: float
    revoked_at: float | None
    rotated_at: float | None
    policy: KeyPolicy

    def state(self, now: float | None = None) -> Literal["active", "revoked", "expired"]:
        if self.revoked_at is not None:
            return "revoked"
        expires = self.policy.expires_at
        if expires is not None and (now if now is not None else time.time()) >= expires:
            return "expired"
        return "active"


def validate_key_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ApplianceError(
            f"{name!r} is not a valid key name",
            hint="Use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (for example the person or service it is for: alice, ci-runner).",
        )
    return name


_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float | None:
    """'90d', '12h', '2w', '1d12h' in seconds; None when the text is not a duration."""
    compact = text.strip().lower()
    if compact and _DURATION.sub("", compact).strip() == "":
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION.findall(compact))
        if seconds > 0:
            return float(seconds)
    return None


def parse_expiry(text: str, now: float | None = None) -> float:
    """'90d', '12h', '2w', '1d12h', or an ISO date ('2027-03-01'): the Unix time it means."""
    now = time.time() if now is None else now
    seconds = parse_duration(text)
    if seconds is not None:
        return now + seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApplianceError(
            f"cannot read {text!r} as an expiry",
            hint="Give a duration such as 90d, 12h or 2w, or a date such as 2027-03-01.",
        ) from None
    when = moment.timestamp()
    if when <= now:
        raise ApplianceError(
            f"the expiry {text!r} is in the past", hint="Give a later date, or a duration."
        )
    return when


def describe_time(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else ""
