"""One run of playbooks/site.yml through ansible-runner, kept in its own run directory.

    <home>/installs/<UTC timestamp>/
        inventory/hosts.yml     the inventory the run used (or a copy of --inventory)
        env/                    extra variables, environment and command line (ansible-runner)
        artifacts/<id>/         every event as JSON, stdout, rc, status (ansible-runner)
        summary.json            per-host counts and failures, written when the run ends

Nothing is removed afterwards: the directory is the record of what an install did.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import InstallError
from appliance.installer.progress import Tracker

PLAYBOOKS_ENV = "APPLIANCE_PLAYBOOKS"


def playbooks_dir() -> Path:
    """playbooks/: $APPLIANCE_PLAYBOOKS, inside the installed package, or in the source tree."""
    env = os.environ.get(PLAYBOOKS_ENV)
    here = Path(__file__).resolve().parent.parent  # the appliance package
    candidates = [Path(env)] if env else [here / "playbooks", here.parent / "playbooks"]
    for candidate in candidates:
        if (candidate / "site.yml").is_file():
            return candidate
    raise InstallError(
        "cannot find the installer playbooks (site.yml)",
        hint=f"Set {PLAYBOOKS_ENV} to the playbooks directory of this appliance release.",
    )


def new_run_dir(home: Path, kind: str = "install") -> Path:
    """<home>/installs/<timestamp>[-doctor], unique even for two runs in one second."""
    root = home / "installs"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = "" if kind == "install" else f"-{kind}"
    for n in range(100):
        path = root / f"{stamp}{suffix}{'' if n == 0 else f'.{n}'}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise InstallError(f"cannot create a run directory under {root}")


@dataclass
class RunRequest:
    run_dir: Path
    inventory: Path
    extravars: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    skip_tags: list[str] = field(default_factory=list)
    limit: str | None = None
    check: bool = False
    diff: bool = False
    verbosity: int = 0
    env: dict[str, str] = field(default_factory=dict)
    playbooks: Path | None = None  # default: playbooks_dir(); a bundle brings its own


@dataclass
class RunResult:
    run_dir: Path
    status: str  # successful, failed, canceled, timeout
    rc: int
    tracker: Tracker

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.tracker.failures

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "rc": self.rc,
            "hosts": {h: self.tracker.totals(h) for h in sorted(self.tracker.hosts)},
            "failures": [asdict(f) for f in self.tracker.failures],
            "changed_tasks": [list(c) for c in self.tracker.changes],
            "findings": self.tracker.findings,
            "driver_plans": self.tracker.plans,
        }


def _cmdline(req: RunRequest) -> str:
    parts = []
    if req.check:
        parts.append("--check")
    if req.diff:
        parts.append("--diff")
    if req.tags:
        parts.append("--tags " + ",".join(req.tags))
    if req.skip_tags:
        parts.append("--skip-tags " + ",".join(req.skip_tags))
    if req.limit:
        parts.append(f"--limit '{req.limit}'")
    return " ".join(parts)


FORKS = 32


def _env(req: RunRequest, playbooks: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    env = {
        # ansible-playbook and its Python must be the ones installed beside the appliance.
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ANSIBLE_ROLES_PATH": str(playbooks / "roles"),
        "ANSIBLE_FILTER_PLUGINS": str(playbooks / "filter_plugins"),
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_NOCOLOR": "true",
        "ANSIBLE_FORCE_COLOR": "false",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        "ANSIBLE_LOCAL_TEMP": str(req.run_dir / "tmp"),
        "ANSIBLE_DEPRECATION_WARNINGS": "false",
        # One SSH round trip per task instead of three; sudo without requiretty allows it.
        "ANSIBLE_PIPELINING": "true",
        # Ansible's default of 5 runs each task on a rack of 32 hosts in seven rounds; the
        # hosts do the work, the installing machine mostly waits on SSH.
        "ANSIBLE_FORKS": str(FORKS),
    }
    env.update(req.env)
    return env


def run_playbook(
    req: RunRequest, on_event: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Run site.yml (or req.playbook) and return what happened; never raises for host failures."""
    import ansible_runner  # imported here: it is only needed by install and doctor

    playbooks = req.playbooks or playbooks_dir()
    playbook = playbooks / "site.yml"
    inventory_dir = req.run_dir / "inventory"
    inventory_dir.mkdir(parents=True, exist_ok=True)
    inventory = inventory_dir / "hosts.yml"
    if req.inventory.resolve() != inventory.resolve():
        shutil.copyfile(req.inventory, inventory_dir / req.inventory.name)
        inventory = inventory_dir / req.inventory.name
    tracker = Tracker()

    def handler(event: dict[str, Any]) -> bool:
        tracker.handle(event)
        if on_event is not None:
            on_event(event)
        return True  # keep every event in the artifacts

    runner = ansible_runner.run(
        private_data_dir=str(req.run_dir),
        playbook=str(playbook),
        inventory=str(inventory),
        extravars=req.extravars,
        envvars=_env(req, playbooks),
        cmdline=_cmdline(req),
        verbosity=req.verbosity or None,
        event_handler=handler,
        ident="ansible",
        quiet=True,
    )
    result = RunResult(req.run_dir, str(runner.status), int(runner.rc or 0), tracker)
    (req.run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result
