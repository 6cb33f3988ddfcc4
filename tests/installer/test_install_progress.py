"""Reading ansible-runner events: per-host progress, failures, the final table."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from appliance.installer.progress import Display, Tracker, failure_message, summary_table


def event(kind: str, host: str | None = None, task: str = "", **data: Any) -> dict[str, Any]:
    return {"event": kind, "event_data": {"host": host, "task": task, **data}}


EVENTS = [
    event("playbook_on_play_start", play="Install the appliance on every host"),
    event("runner_on_start", "gpu01", "Install the driver packages"),
    event("runner_on_ok", "gpu01", "Install the driver packages", res={"changed": True}),
    event("runner_on_ok", "gpu02", "Install the driver packages", res={"changed": False}),
    # A task's result that looks like findings is not taken for them: only the custom stats are.
    event(
        "runner_on_ok",
        "gpu02",
        "Report the preflight findings",
        res={"preflight_result.findings": [{"check": "os", "status": "ok", "detail": "Debian"}]},
    ),
    event(
        "runner_on_failed",
        "gpu02",
        "Check the loaded driver version",
        res={"msg": "nvidia-smi reports 550.90.07 instead of 580.95.05"},
        ignore_errors=None,
    ),
    event("runner_on_failed", "gpu01", "Probe something", res={"msg": "x"}, ignore_errors=True),
    event(
        "runner_on_unreachable",
        "gpu03",
        "Gathering Facts",
        res={
            "msg": "Failed to connect to the host via ssh: ssh: connect to host 10.0.0.13 "
            "port 22: No route to host"
        },
    ),
    event(
        "playbook_on_stats",
        changed={"gpu01": 1},
        dark={"gpu03": 1},
        failures={"gpu02": 1},
        ignored={"gpu01": 1},
        ok={"gpu01": 3, "gpu02": 1},
        processed={"gpu01": 1, "gpu02": 1, "gpu03": 1},
        rescued={},
        skipped={"gpu02": 4},
        artifact_data={
            "preflight_findings": {
                "gpu01": [{"check": "os", "status": "ok", "detail": "Ubuntu 22.04"}]
            },
            "driver_plans": {"gpu01": {"version": "580.95.05", "gpus": "8 x NVIDIA H200"}},
        },
    ),
]


def tracked() -> Tracker:
    tracker = Tracker()
    for e in EVENTS:
        tracker.handle(e)
    return tracker


def test_tracker_counts_failures_and_findings() -> None:
    tracker = tracked()
    assert tracker.play == "Install the appliance on every host"
    assert tracker.changes == [("gpu01", "Install the driver packages")]
    assert [(f.host, f.task, f.unreachable) for f in tracker.failures] == [
        ("gpu02", "Check the loaded driver version", False),
        ("gpu03", "Gathering Facts", True),
    ]
    assert tracker.failures[0].message == "nvidia-smi reports 550.90.07 instead of 580.95.05"
    assert tracker.findings == {
        "gpu01": [{"check": "os", "status": "ok", "detail": "Ubuntu 22.04"}]
    }
    assert tracker.plans == {"gpu01": {"version": "580.95.05", "gpus": "8 x NVIDIA H200"}}
    assert tracker.totals("gpu02") == {
        "ok": 1, "changed": 0, "failed": 1, "unreachable": 0, "skipped": 4,
    }  # fmt: skip
    assert tracker.totals("gpu03")["unreachable"] == 1


def test_summary_table_lists_every_host() -> None:
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(summary_table(tracked()))
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["host", "ok", "changed", "failed", "unreachable", "skipped"]
    assert lines[1].split() == ["gpu01", "3", "1", "0", "0", "0"]
    assert lines[2].split() == ["gpu02", "1", "0", "1", "0", "4"]
    assert lines[3].split() == ["gpu03", "0", "0", "0", "1", "0"]


def test_plain_display_prints_changes_and_failures_only() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    tracker = Tracker()
    with Display(console, tracker) as display:
        for e in EVENTS:
            tracker.handle(e)
            display.event(e)
    lines = out.getvalue().splitlines()
    assert lines == [
        "== Install the appliance on every host",
        "gpu01  changed     Install the driver packages",
        "gpu02  FAILED      Check the loaded driver version",
        "gpu01  ignored     Probe something",
        "gpu03  UNREACHABLE Gathering Facts",
    ]


def test_failure_message_prefers_what_helps() -> None:
    assert failure_message(
        {"msg": "non-zero return code", "stderr": "E: Unable to locate package x"}
    ) == ("E: Unable to locate package x")
    loop = {
        "msg": "",
        "results": [{"item": "a", "failed": False}, {"item": "b", "failed": True, "msg": "boom"}],
    }
    assert failure_message(loop) == "item 'b': boom"
    assert failure_message({"module_stderr": "Traceback ..."}) == "Traceback ..."


def test_diffs_are_collected_for_check_mode() -> None:
    tracker = Tracker()
    tracker.handle(
        event(
            "runner_on_file_diff",
            "gpu01",
            "Write appliance.toml",
            diff=[
                {
                    "before": "port = 8000\n",
                    "after": "port = 443\n",
                    "before_header": "/etc/appliance/appliance.toml",
                    "after_header": "appliance.toml.j2",
                }
            ],
        )
    )
    tracker.handle(
        event(
            "runner_on_file_diff",
            "gpu01",
            "Install xfsprogs",
            diff={"prepared": "1 newly installed"},
        )
    )
    (host, task, text), (_, _, prepared) = tracker.diffs
    assert (host, task) == ("gpu01", "Write appliance.toml")
    assert text.splitlines() == [
        "--- /etc/appliance/appliance.toml",
        "+++ appliance.toml.j2",
        "@@ -1 +1 @@",
        "-port = 8000",
        "+port = 443",
    ]
    assert prepared == "1 newly installed\n"
