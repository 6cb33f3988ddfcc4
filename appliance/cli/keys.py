"""`appliance key create|list|show|rotate|revoke|delete`: API keys for the endpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from appliance.audit import admin_event
from appliance.cli.common import config_of, console, print_json, print_table
from appliance.errors import ApplianceError
from appliance.keys import DATA_CLASSES, KeyPolicy, KeyRecord, describe_time, parse_expiry
from appliance.state import State

app = typer.Typer(
    help="Create, list, show, rotate, revoke and delete API keys.", no_args_is_help=True
)


def _state(ctx: typer.Context) -> State:
    return State(config_of(ctx).state_db)


def _record(ctx: typer.Context, name: str) -> KeyRecord:
    records = [k for k in _state(ctx).key_records() if k.name == name]
    if not records:
        raise ApplianceError(f"no API key named {name!r}", hint="`appliance key list` shows them.")
    # The active one if there is one, else the newest.
    active = [k for k in records if k.state() == "active"]
    return (active or records)[-1]


def _as_json(key: KeyRecord) -> dict[str, Any]:
    return {
        "name": key.name,
        "prefix": key.prefix,
        "state": key.state(),
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "rotated_at": key.rotated_at,
        **key.policy.model_dump(mode="json"),
    }


def _limits(policy: KeyPolicy) -> str:
    parts = [
        f"{value} {unit}"
        for value, unit in (
            (policy.rpm, "rpm"),
            (policy.tpm, "tpm"),
            (policy.concurrency, "at once"),
            (policy.max_tokens, "max_tokens"),
            (policy.max_prompt_tokens, "prompt tokens"),
        )
        if value is not None
    ]
    return ", ".join(parts) or "none"


def _show_secret(name: str, key: str, what: str) -> None:
    console.print(f"{what} key {name!r}. It is shown only now:")
    # Plain print: no wrapping or markup may touch the secret.
    print(key)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A name for the key: who or what it is for."),
    models: str | None = typer.Option(
        None, "--models", help="Comma-separated models the key may call (default: every model)."
    ),
    rpm: int | None = typer.Option(None, "--rpm", min=1, help="Requests per minute."),
    tpm: int | None = typer.Option(
        None, "--tpm", min=1, help="Tokens per minute, prompt and completion together."
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="Requests in flight at once."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Largest max_tokens of one request."
    ),
    max_prompt_tokens: int | None = typer.Option(
        None, "--max-prompt-tokens", min=1, help="Largest prompt of one request, in tokens."
    ),
    data_class: str = typer.Option(
        "internal",
        "--data-class",
        help=f"The most sensitive data the key may send: {', '.join(DATA_CLASSES)}.",
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="When the key stops working: 90d, 12h, 2w, or a date."
    ),
    admin: bool = typer.Option(False, "--admin", help="Admin scope: also the admin API."),
    log_bodies: int | None = typer.Option(
        None,
        "--log-bodies",
        min=1,
        max=3650,
        metavar="DAYS",
        help="Keep this key's prompts and answers for DAYS days (off unless given).",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        help="Write the key to this new file (mode 0600) instead of printing it, for "
        "programs that read it from a file (Prometheus's credentials_file).",
    ),
) -> None:
    """Create a key and print it once; only its digest is stored."""
    if output is not None and output.exists():
        raise ApplianceError(
            f"{output} exists; the key is written only to a new file",
            hint="Remove it (and revoke the key it holds) or give another path.",
        )
    if data_class not in DATA_CLASSES:
        raise ApplianceError(
            f"unknown data class {data_class!r}",
            hint=f"Use one of: {', '.join(DATA_CLASSES)}.",
        )
    chosen = tuple(m.strip() for m in models.split(",") if m.strip()) if models else None
    if models is not None and not chosen:
        raise ApplianceError("--models names no model", hint="Give names separated by commas.")
    policy = KeyPolicy.model_validate(
        {
            "scope": "admin" if admin else "user",
            "models": chosen,
            "rpm": rpm,
            "tpm": tpm,
            "concurrency": concurrency,
            "max_tokens": max_tokens,
            "max_prompt_tokens": max_prompt_tokens,
            "data_class": data_class,
            "expires_at": parse_expiry(expires) if expires else None,
            "log_bodies_days": log_bodies,
        },
        strict=False,
    )
    detail = policy.model_dump(mode="json", exclude_defaults=True)
    if output is not None and not output.parent.is_dir():
        raise ApplianceError(
            f"{output.parent} is not a directory", hint="Create it first, or give another path."
        )
    key = _state(ctx).create_key(name, policy, audit=admin_event("key created", name, detail))
    if output is None:
        _show_secret(name, key, "Created")
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    console.print(f"Created key {name!r}; it is in {output} (mode 0600), and shown nowhere else.")


@app.command("list")
def list_keys(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List keys: names, prefixes, state and policy (never the keys themselves)."""
    keys = _state(ctx).key_records()
    if as_json:
        print_json([_as_json(k) for k in keys])
        return
    rows = [
        [
            key.name,
            key.prefix + "...",
            key.state(),
            key.policy.scope,
            ",".join(key.policy.models) if key.policy.models else "all",
            _limits(key.policy),
            describe_time(key.policy.expires_at) or "never",
            describe_time(key.created_at),
        ]
        for key in keys
    ]
    print_table(
        ["name", "prefix", "state", "scope", "models", "limits", "expires", "created"], rows
    )


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The key's name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show one key's state and policy."""
    key = _record(ctx, name)
    if as_json:
        print_json(_as_json(key))
        return
    policy = key.policy
    rows = [
        ["prefix", key.prefix + "..."],
        ["state", key.state()],
        ["scope", policy.scope],
        ["models", ", ".join(policy.models) if policy.models else "every model"],
        ["limits", _limits(policy)],
        ["data class", policy.data_class],
        [
            "bodies",
            f"kept {policy.log_bodies_days} days" if policy.log_bodies_days else "never kept",
        ],
        ["expires", describe_time(policy.expires_at) or "never"],
        ["created", describe_time(key.created_at)],
        ["rotated", describe_time(key.rotated_at) or "never"],
        ["revoked", describe_time(key.revoked_at) or "no"],
    ]
    console.print(f"[bold]{key.name}[/]")
    print_table(["", ""], rows)


@app.command("rotate")
def rotate(ctx: typer.Context, name: str = typer.Argument(..., help="The key's name.")) -> None:
    """Replace an active key's secret, keeping its name and policy; the old secret stops
    working within a second."""
    key = _state(ctx).rotate_key(name, audit=admin_event("key rotated", name))
    _show_secret(name, key, "Rotated")


@app.command("revoke")
def revoke(ctx: typer.Context, name: str = typer.Argument(..., help="The key's name.")) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    if not _state(ctx).revoke_key(name, audit=admin_event("key revoked", name)):
        raise ApplianceError(
            f"no active key named {name!r}", hint="`appliance key list` shows the keys."
        )
    console.print(f"Revoked {name!r}.")


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The key's name."),
    force: bool = typer.Option(False, "--force", help="Delete it even while it is active."),
) -> None:
    """Forget a revoked or expired key (usage records keep its name)."""
    event = admin_event("key deleted", name, {"force": force})
    count = _state(ctx).delete_key(name, force=force, audit=event)
    console.print(f"Deleted {count} key(s) named {name!r}.")
