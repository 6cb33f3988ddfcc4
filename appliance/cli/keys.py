"""`appliance key create|list|revoke`: API keys for the endpoint."""

from __future__ import annotations

import time

import typer

from appliance.cli.common import config_of, console, print_table
from appliance.errors import ApplianceError
from appliance.state import State

app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@app.command("create")
def create(ctx: typer.Context, name: str = typer.Argument(..., help="A name for the key.")) -> None:
    """Create a key and print it once; only its digest is stored."""
    key = State(config_of(ctx).state_db).create_key(name)
    console.print(f"Created key {name!r}. It is shown only now:")
    print(key)


@app.command("list")
def list_keys(ctx: typer.Context) -> None:
    """List keys (names and prefixes; never the keys themselves)."""
    rows = [
        [
            key.name,
            key.prefix + "...",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at)),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(key.revoked_at))
            if key.revoked_at
            else "",
        ]
        for key in State(config_of(ctx).state_db).list_keys()
    ]
    print_table(["name", "prefix", "created", "revoked"], rows)


@app.command("revoke")
def revoke(ctx: typer.Context, name: str = typer.Argument(..., help="The key's name.")) -> None:
    """Revoke a key; the gateway rejects it within seconds."""
    if not State(config_of(ctx).state_db).revoke_key(name):
        raise ApplianceError(
            f"no active key named {name!r}", hint="`appliance key list` shows the keys."
        )
    console.print(f"Revoked {name!r}.")
