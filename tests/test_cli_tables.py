"""Tables fit the terminal without splitting a word or a number, at 80 columns and wider."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from appliance.catalog import load_catalog
from appliance.cli.common import print_table
from appliance.placement import Cluster
from appliance.planner import evaluate
from appliance.planner.memory import GIB
from appliance.state import State

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [80, 200]


def render(headers: list[str], rows: list[list[str]], width: int, keys: int = 1) -> str:
    out = Console(file=io.StringIO(), width=width, highlight=False, color_system=None)
    print_table(headers, rows, keys=keys, out=out)
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


def words_whole(text: str, rows: list[list[str]]) -> None:
    """Every word of every cell appears whole, between spaces, in the rendering."""
    tokens = set(text.split())
    for row in rows:
        for cell in row:
            for word in cell.split():
                assert word in tokens, f"{word!r} was split or lost:\n{text}"


def fits(text: str, width: int) -> None:
    for line in text.splitlines():
        assert len(line.rstrip()) <= width, f"wider than {width}: {line!r}"


WIDE = [
    ["model", "kind", "params", "engines", "added", "in store", "healthy"],
    [
        ["mistral-small-3.1-24b-instruct", "chat", "405.85B", "vllm,trtllm", "yes", "yes", "2"],
        ["qwen3-embedding-8b", "embedding", "7.57B", "vllm", "", "", ""],
    ],
]


@pytest.mark.parametrize("width", WIDTHS)
def test_a_wide_table_fits_without_splitting_cells(width: int) -> None:
    headers, rows = WIDE
    text = render(headers, rows, width)
    fits(text, width)
    words_whole(text, rows)
    words_whole(text, [headers])


def test_a_table_that_fits_is_one_table_on_one_line_per_row() -> None:
    headers, rows = WIDE
    text = render(headers, rows, 200)
    assert len(text.splitlines()) == 1 + len(rows)
    assert text.splitlines()[0].split() == ["model", "kind", "params", "engines", "added", "in",
                                            "store", "healthy"]  # fmt: skip


def test_too_wide_tables_split_into_tables_that_repeat_the_key_columns() -> None:
    headers, rows = WIDE
    text = render(headers, rows, 60)
    fits(text, 60)
    words_whole(text, rows)
    tables = text.split("\n\n")
    assert len(tables) > 1
    for table in tables:
        assert table.splitlines()[0].startswith("model")
        assert "mistral-small-3.1-24b-instruct" in table and "qwen3-embedding-8b" in table


def test_cells_wrap_between_words_before_a_table_splits() -> None:
    headers = ["check", "detail", "fix"]
    detail = "port(s) 6379, 8265 already in use by another service " * 2
    fix = "Stop the service that listens there (`ss -ltnp`) and run it again"
    rows = [["ports", detail.strip(), fix]]
    text = render(headers, rows, 80)
    fits(text, 80)
    words_whole(text, rows)
    assert "\n\n" not in text.strip()  # one table, its long cells wrapped
    assert text.splitlines()[0].split() == headers


def test_markup_in_cells_is_printed_as_written() -> None:
    text = render(["name"], [["[red]alice[/]"]], 80)
    assert "[red]alice[/]" in text


def cli(home: Path, width: int, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True, text=True, timeout=120, cwd=home.parent,
        env={**os.environ, "APPLIANCE_HOME": str(home), "COLUMNS": str(width),
             "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("width", WIDTHS)
def test_plan_fits(tmp_path: Path, width: int) -> None:
    text = cli(tmp_path / "home", width, "plan", "llama-4-scout", "--gpus", "8xH100-80GB")
    fits(text, width)
    tokens = set(text.split())
    # Every candidate's figures appear whole (the 80-column layout used to cut a prefill
    # rate in two, "51,0" / "83"), and so does the header; the figures are the planner's.
    report = evaluate(load_catalog().get("llama-4-scout"), Cluster.parse("8xH100-80GB"))
    figures = {"prefill", "tok/s"}
    for c in report.candidates:
        figures.add(f"{c.memory.free / GIB:.1f}")
        if c.fits and c.throughput is not None:
            figures |= {f"{c.throughput.prefill_tok_s:,.0f}", f"{c.throughput.output_tok_s:,.0f}"}
    assert len(figures) > 10
    assert figures <= tokens, figures - tokens


@pytest.mark.parametrize("width", WIDTHS)
def test_model_list_all_fits(tmp_path: Path, width: int) -> None:
    text = cli(tmp_path / "home", width, "model", "list", "--all")
    fits(text, width)
    tokens = set(text.split())
    assert {"vllm,trtllm", "405.85B", "embedding", "mistral-small-3.1-24b-instruct"} <= tokens
    # No appliance runs: no column of blank healthy counts.
    assert "healthy" not in tokens


@pytest.mark.parametrize("width", WIDTHS)
def test_key_list_keeps_every_column(tmp_path: Path, width: int) -> None:
    home = tmp_path / "home"
    state = State(home / "state.db")
    long_name = "an-even-longer-name-for-the-ci-robot-account"
    for name in ("alice-laptop", long_name, "bob"):
        state.create_key(name)
    state.revoke_key("bob")
    text = cli(home, width, "key", "list")
    fits(text, width)
    tokens = text.split()
    for header in ("name", "prefix", "state", "scope", "models", "limits", "expires", "created"):
        assert header in tokens
    assert long_name in tokens and "bob" in tokens and "revoked" in tokens
    (bob,) = [key for key in state.key_records() if key.name == "bob"]
    assert f"{bob.prefix}..." in tokens
    # Created: each date whole, once per key.
    dates = [t for t in tokens if len(t) == 10 and t[4] == "-" and t[7] == "-"]
    assert len(dates) == 3
