"""The `appliance` command line.

Errors raised as ApplianceError are caught in one place (`main`) and printed with what
to do next; `--debug` adds the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from appliance import __version__
from appliance.cli import cost, governance, install, keys, lifecycle, logs, models, plan, top
from appliance.cli.common import console, err_console
from appliance.errors import ApplianceError

app = typer.Typer(
    name="appliance",
    help="On-prem LLM serving appliance: serve catalog models behind an OpenAI-compatible "
    "endpoint.\n\nWith no appliance.toml everything runs on this machine: a local Ray, the "
    "tiny-random-llama model on vLLM's CPU build.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="appliance.toml to use (default: $APPLIANCE_CONFIG, ./appliance.toml, "
        "/etc/appliance/appliance.toml, else the embedded default).",
        dir_okay=False,
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = {"config_path": config, "debug": debug}


app.command("up")(lifecycle.up)
app.command("down")(lifecycle.down)
app.command("status")(lifecycle.status)
app.command("config")(lifecycle.show_config)
app.command("plan")(plan.plan)
app.command("cost")(cost.cost)
app.command("install")(install.install)
app.command("doctor")(install.doctor)
app.command("bundle")(install.bundle)
app.add_typer(models.app, name="model")
app.add_typer(keys.app, name="key")
app.command("usage")(governance.usage)
app.command("logs")(logs.logs)
app.command("top")(top.top)
app.add_typer(governance.audit_app, name="audit")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: typer reports usage errors (exit 2), Exit and Ctrl-C itself;
        # only our own errors come out of it.
        app(args=args, prog_name="appliance")
    except ApplianceError as exc:
        if debug:
            err_console.print_exception()
        # Messages name config tables ([models.x]) and quote tools ([Errno 2]): not markup.
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        if exc.hint:
            err_console.print(exc.hint, highlight=False, markup=False)
        sys.exit(1)
