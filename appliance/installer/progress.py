"""What ansible-runner's events say: progress per host, failures, and the final counts.

`Tracker.handle` takes each event as ansible-runner delivers it; it keeps, per host, the task
it is on and its counts, the failures with their messages, and what the roles return in the
run's custom stats (`set_stats`, delivered with the final stats event as `artifact_data`):
the preflight findings and the driver plans, per host. `Display` draws that on a terminal
(a live table) or as one line per result in a pipe.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text


@dataclass
class HostState:
    task: str = ""
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: int = 0


@dataclass(frozen=True)
class Failure:
    host: str
    task: str
    message: str
    unreachable: bool = False


@dataclass
class Tracker:
    hosts: dict[str, HostState] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] | None = None
    changes: list[tuple[str, str]] = field(default_factory=list)  # (host, task) that changed
    diffs: list[tuple[str, str, str]] = field(default_factory=list)  # (host, task, diff)
    play: str = ""

    def host(self, name: str) -> HostState:
        return self.hosts.setdefault(name, HostState())

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host")
        task = str(data.get("task") or "")
        res = data.get("res") or {}
        if kind == "playbook_on_play_start":
            self.play = str(data.get("play") or "")
        elif kind == "runner_on_start" and host:
            self.host(host).task = task
        elif kind == "runner_on_ok" and host:
            state = self.host(host)
            state.ok += 1
            if res.get("changed"):
                state.changed += 1
                self.changes.append((host, task))
        elif kind == "runner_on_file_diff" and host:
            text = diff_text(data.get("diff"))
            if text.strip():
                self.diffs.append((host, task, text))
        elif kind == "runner_on_skipped" and host:
            self.host(host).skipped += 1
        elif kind == "runner_on_failed" and host:
            if data.get("ignore_errors"):
                self.host(host).ok += 1
                return
            self.host(host).failed += 1
            self.failures.append(Failure(host, task, failure_message(res)))
        elif kind == "runner_on_unreachable" and host:
            self.host(host).unreachable += 1
            self.failures.append(Failure(host, task, failure_message(res), unreachable=True))
        elif kind == "playbook_on_stats":
            self.stats = {
                key: dict(data.get(key) or {})
                for key in ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")
            }
            for name in set().union(*(self.stats[k] for k in self.stats)):
                self.host(name)
            returned = data.get("artifact_data") or {}
            for name, items in (returned.get("preflight_findings") or {}).items():
                self.findings[name] = list(items)
            for name, plan in (returned.get("driver_plans") or {}).items():
                self.plans[name] = dict(plan)

    def totals(self, host: str) -> dict[str, int]:
        """ok/changed/failed/unreachable/skipped of a host: the recap when there is one."""
        if self.stats is not None:
            return {
                "ok": self.stats["ok"].get(host, 0),
                "changed": self.stats["changed"].get(host, 0),
                "failed": self.stats["failures"].get(host, 0),
                "unreachable": self.stats["dark"].get(host, 0),
                "skipped": self.stats["skipped"].get(host, 0),
            }
        s = self.host(host)
        return {
            "ok": s.ok,
            "changed": s.changed,
            "failed": s.failed,
            "unreachable": s.unreachable,
            "skipped": s.skipped,
        }


def diff_text(diff: Any, max_lines: int = 200) -> str:
    """What --diff shows for one result: a unified diff of files, or the module's own text."""
    if isinstance(diff, list):
        return "".join(diff_text(d, max_lines) for d in diff)
    if not isinstance(diff, dict):
        return ""
    if "prepared" in diff:
        text = str(diff["prepared"])
    elif "before" in diff or "after" in diff:
        before, after = str(diff.get("before", "")), str(diff.get("after", ""))
        text = "".join(
            difflib.unified_diff(
                before.splitlines(True),
                after.splitlines(True),
                str(diff.get("before_header", "before")),
                str(diff.get("after_header", "after")),
            )
        )
    else:
        return ""
    lines = text.splitlines(True)
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... {len(lines) - max_lines} more lines\n"]
    return "".join(lines) if not lines or lines[-1].endswith("\n") else "".join(lines) + "\n"


def failure_message(res: dict[str, Any]) -> str:
    """The useful part of a failed result: the module's message, else the end of stderr."""
    msg = str(res.get("msg") or "").strip()
    stderr = str(res.get("stderr") or "").strip()
    if msg in ("", "non-zero return code", "MODULE FAILURE") and stderr:
        msg = stderr.splitlines()[-1] if len(stderr) > 400 else stderr
    if not msg and res.get("results"):  # a loop: the first item that failed
        for item in res["results"]:
            if isinstance(item, dict) and item.get("failed"):
                return f"item {item.get('item')!r}: {failure_message(item)}"
    if not msg:
        msg = str(res.get("module_stderr") or res.get("stdout") or "failed").strip()
    return msg


def summary_table(tracker: Tracker) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(column, no_wrap=True, justify="left" if column == "host" else "right")
    for name in sorted(tracker.hosts):
        t = tracker.totals(name)
        failed = f"[red]{t['failed']}[/]" if t["failed"] else "0"
        dark = f"[red]{t['unreachable']}[/]" if t["unreachable"] else "0"
        changed = f"[yellow]{t['changed']}[/]" if t["changed"] else "0"
        table.add_row(Text(name), str(t["ok"]), changed, failed, dark, str(t["skipped"]))
    return table


class Display:
    """Shows progress while the playbook runs: a live table on a terminal, lines otherwise."""

    def __init__(self, console: Console, tracker: Tracker) -> None:
        self.console = console
        self.tracker = tracker
        self.live: Live | None = None
        self.started = time.monotonic()

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(None, None, None)

    def _table(self) -> Table:
        elapsed = time.monotonic() - self.started
        table = Table(
            box=None,
            pad_edge=False,
            header_style="bold",
            title=f"{self.tracker.play or 'starting'}  ({elapsed:.0f}s)",
            title_justify="left",
        )
        for column in ("host", "task", "ok", "changed", "failed"):
            table.add_column(column, no_wrap=column != "task", overflow="ellipsis")
        for name in sorted(self.tracker.hosts):
            s = self.tracker.hosts[name]
            table.add_row(
                Text(name),
                Text(s.task),
                str(s.ok),
                f"[yellow]{s.changed}[/]" if s.changed else "0",
                f"[red]{s.failed + s.unreachable}[/]" if s.failed + s.unreachable else "0",
            )
        return table

    def event(self, event: dict[str, Any]) -> None:
        if self.live is not None:
            self.live.update(self._table())
            return
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host, task = data.get("host"), data.get("task")
        words = {
            "runner_on_ok": "changed" if (data.get("res") or {}).get("changed") else "ok",
            "runner_on_failed": "ignored" if data.get("ignore_errors") else "FAILED",
            "runner_on_unreachable": "UNREACHABLE",
        }
        if kind in words and host:
            # Plain lines for logs and pipes: unchanged results would drown the rest.
            if words[kind] != "ok":
                line = f"{host}  {words[kind]:<11} {task}"
                self.console.print(line, highlight=False, markup=False)
        elif kind == "playbook_on_play_start":
            self.console.print(f"== {data.get('play')}", highlight=False, markup=False)
