"""`appliance cost`: the arithmetic on hand-computed examples, the edges, the chart, the CLI."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import typer

from appliance import cost as c
from appliance.catalog import load_catalog
from appliance.cli.cost import cost as cost_command
from appliance.config import ApplianceConfig
from appliance.costchart import nice_ticks, render_html, summary_lines
from appliance.errors import ApplianceError, CostError, PlanError
from appliance.placement import Cluster
from appliance.planner import Workload, evaluate
from tests.conftest import Result


def inputs(**kw: Any) -> c.CostInputs:
    return c.CostInputs.model_validate(kw)


# Example A, by hand. Cloud: 1:1 workload at $1 in / $3 out = $2 per 1M, so 1e9 tokens a
# month cost $2,000. On-prem: hardware 24,000 / 24 = $1,000; power 1 kW, all of it drawn
# whatever the load (idle 1.0), PUE 1, $0.10/kWh: 730 h x $0.10 = $73; staff 1 FTE at
# $12,000 a year = $1,000; other $27. Running cost 73 + 1,000 + 27 = $1,100, total $2,100.
# One node: 1,000 output tok/s x 2 tokens per output token x 2,628,000 s = 5.256e9 tokens
# a month at full load, 2.628e9 at 50% utilization.
EXAMPLE_A = {
    "volume_tokens_month": 1e9,
    "mean_input_tokens": 1,
    "mean_output_tokens": 1,
    "price_input_usd_per_mtok": 1.0,
    "price_output_usd_per_mtok": 3.0,
    "throughput_tok_s": 1000.0,
    "utilization": 0.5,
    "nodes": 1,
    "node_capex_usd": 24_000.0,
    "amortization_months": 24,
    "node_power_kw": 1.0,
    "idle_power_fraction": 1.0,
    "pue": 1.0,
    "power_usd_per_kwh": 0.1,
    "colo_usd_per_kw_month": 0.0,
    "cooling_usd_per_node_month": 0.0,
    "staff_fte": 1.0,
    "staff_loaded_usd_year": 12_000.0,
    "other_usd_month": 27.0,
}


class TestArithmetic:
    def test_monthly_costs_by_hand(self) -> None:
        i = inputs(**EXAMPLE_A)
        parts = c.onprem_monthly(i, 1e9)
        assert parts.hardware == pytest.approx(1000)
        assert parts.power == pytest.approx(73)
        assert parts.staff == pytest.approx(1000)
        assert parts.other == 27
        assert parts.total == pytest.approx(2100)
        assert parts.running == pytest.approx(1100)
        assert c.cloud_monthly(i, 1e9) == pytest.approx(2000)
        assert c.node_full_tokens_month(i) == pytest.approx(5.256e9)
        assert c.node_capacity_tokens_month(i) == pytest.approx(2.628e9)

    def test_break_even_month(self) -> None:
        # The $24,000 up front is won back at $2,000 - $1,100 = $900 a month.
        i = inputs(**EXAMPLE_A)
        assert c.break_even_months(i, 1e9) == pytest.approx(24_000 / 900)
        on, cloud = c.cumulative_usd(i, 1e9, 24_000 / 900)
        assert on == pytest.approx(cloud)

    def test_break_even_volume(self) -> None:
        # Fixed per node A = 1,000 hardware + 73 power; shared S = 1,000 staff + 27 other;
        # no energy per token (idle 1.0). (A + S) / $2e-6 per token = 1.05e9 tokens.
        i = inputs(**EXAMPLE_A)
        assert c.break_even_volume(i) == (pytest.approx(1.05e9), 1)
        # At exactly that volume the hardware pays back in exactly its amortization period.
        assert c.break_even_months(i, 1.05e9) == pytest.approx(24)

    def test_cost_per_million_tokens(self) -> None:
        # 3:1 input:output, 1,000 output tok/s: 4 tokens per output token, so 1.0512e10
        # tokens a month at full load and 2.628e9 at 25%. Power: 2 kW x (0.5 idle + 0.5 x
        # 0.25 busy) x 730 h x PUE 1.5 x $0.10 = $136.875. Hardware 36,000 / 36 = $1,000,
        # colo 2 kW x $100 = $200, cooling $50: $1,386.875 for 2,628M tokens.
        i = inputs(
            mean_input_tokens=3,
            mean_output_tokens=1,
            throughput_tok_s=1000.0,
            utilization=0.25,
            node_capex_usd=36_000.0,
            amortization_months=36,
            node_power_kw=2.0,
            idle_power_fraction=0.5,
            pue=1.5,
            power_usd_per_kwh=0.1,
            colo_usd_per_kw_month=100.0,
            cooling_usd_per_node_month=50.0,
            staff_fte=0.0,
            volume_tokens_month=2.628e9,
        )
        report = c.analyze(i)
        assert report.onprem.power == pytest.approx(136.875)
        assert report.onprem.total == pytest.approx(1386.875)
        assert report.onprem_usd_per_mtok_at_utilization == pytest.approx(1386.875 / 2628)
        assert report.onprem_usd_per_mtok == pytest.approx(1386.875 / 2628)
        # The API at 3:1 with the default $2 / $8: (3 x 2 + 8) / 4 = $3.50 per 1M.
        assert report.cloud_usd_per_mtok == pytest.approx(3.5)

    def test_volume_where_lines_cross_needs_a_second_node(self) -> None:
        # Per node $1,000 (hardware only), shared $3,000 (staff), $1 per 1M tokens, 2.628e9
        # tokens per node. One node never wins (it earns at most $2,628); two win from
        # (2 x 1,000 + 3,000) / $1e-6 = 5e9 tokens, below their 5.256e9 capacity.
        i = inputs(
            mean_input_tokens=1,
            mean_output_tokens=1,
            price_input_usd_per_mtok=1.0,
            price_output_usd_per_mtok=1.0,
            throughput_tok_s=500.0,
            utilization=1.0,
            node_capex_usd=12_000.0,
            amortization_months=12,
            power_usd_per_kwh=0.0,
            colo_usd_per_kw_month=0.0,
            staff_fte=1.0,
            staff_loaded_usd_year=36_000.0,
        )
        assert c.break_even_volume(i) == (pytest.approx(5e9), 2)
        assert c.onprem_monthly(i, 4.9e9).total > c.cloud_monthly(i, 4.9e9)
        assert c.onprem_monthly(i, 5.1e9).total < c.cloud_monthly(i, 5.1e9)
        # Just past two nodes' capacity the third node makes the API cheaper again.
        assert c.nodes_for(i, 5.3e9) == 3
        assert c.onprem_monthly(i, 5.3e9).total > c.cloud_monthly(i, 5.3e9)

    def test_nodes_grow_with_volume_and_never_drop_below_the_deployment(self) -> None:
        i = inputs(**{**EXAMPLE_A, "nodes": 2, "throughput_tok_s": 2000.0})
        cap = c.node_capacity_tokens_month(i)
        assert cap == pytest.approx(2.628e9)  # throughput is for the 2 nodes together
        assert c.nodes_for(i, 0) == 2
        assert c.nodes_for(i, 2 * cap) == 2
        assert c.nodes_for(i, 2 * cap + 1e6) == 3

    def test_with_throughput_feeds_a_prediction_and_validates_it(self) -> None:
        i = c.CostInputs().with_throughput(25_000.0)
        assert i.throughput_tok_s == 25_000.0
        with pytest.raises(ValueError, match="throughput_tok_s"):
            c.CostInputs().with_throughput(0.0)

    def test_with_throughput_sets_the_nodes_it_is_for_when_given(self) -> None:
        i = inputs(nodes=3)
        assert i.with_throughput(25_000.0).nodes == 3
        assert i.with_throughput(25_000.0, nodes=2).nodes == 2
        with pytest.raises(ValueError, match="nodes"):
            i.with_throughput(25_000.0, nodes=0)


class TestEdges:
    def test_on_prem_never_cheaper_says_so(self) -> None:
        i = inputs(price_input_usd_per_mtok=0.05, price_output_usd_per_mtok=0.1)
        report = c.analyze(i)
        assert report.break_even_volume is None
        assert report.break_even_nodes is None
        assert report.break_even_months is None
        text = " ".join(summary_lines(report))
        assert "never cheaper" in text
        assert "never pays back" in text

    def test_free_api_and_free_power_do_not_divide_by_zero(self) -> None:
        i = inputs(
            price_input_usd_per_mtok=0.0, price_output_usd_per_mtok=0.0, power_usd_per_kwh=0.0
        )
        report = c.analyze(i)
        assert report.break_even_volume is None
        assert report.break_even_months is None
        assert report.cloud_usd_month == 0

    def test_zero_volume(self) -> None:
        report = c.analyze(inputs(volume_tokens_month=0))
        assert report.cloud_usd_month == 0
        assert report.onprem_usd_per_mtok is None
        assert report.break_even_months is None
        assert report.nodes == 1
        assert report.break_even_volume is not None  # the crossing does not depend on it
        assert any("zero volume" in line for line in summary_lines(report))
        assert "<svg" in render_html(report)

    def test_payback_after_the_hardware_life_is_reported(self) -> None:
        report = c.analyze(inputs(volume_tokens_month=1.5e9))
        assert report.break_even_months is not None
        assert report.break_even_months > 36
        assert not report.pays_back_within_life
        assert any("after the end of" in line for line in summary_lines(report))
        assert "beyond this chart" in render_html(report)

    def test_free_hardware_pays_back_at_once(self) -> None:
        assert c.break_even_months(inputs(node_capex_usd=0.0), 5e9) == 0


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "tokens"),
        [
            ("5B", 5e9),
            ("300M", 3e8),
            ("2.5e9", 2.5e9),
            ("750k", 7.5e5),
            ("1_000", 1000.0),
            ("2T", 2e12),
            ("0", 0.0),
            (42, 42.0),
        ],
    )
    def test_token_counts(self, text: object, tokens: float) -> None:
        assert c.parse_tokens(text) == tokens

    @pytest.mark.parametrize("text", ["5X", "", "B", "five", True, None])
    def test_bad_token_counts(self, text: object) -> None:
        with pytest.raises(ValueError):
            c.parse_tokens(text)

    def test_workload(self) -> None:
        assert c.parse_workload("2048:128") == (2048, 128)
        for bad in ("2048", "a:b", "1:2:3"):
            with pytest.raises(ValueError, match="IN:OUT"):
                c.parse_workload(bad)

    def test_money_and_tokens_read_short(self) -> None:
        assert [c.format_usd(x) for x in (0, 0.1, 0.333, 5, 261.3, 8333.3, 3e5, 1.5e6)] == [
            "$0",
            "$0.10",
            "$0.333",
            "$5.00",
            "$261",
            "$8,333",
            "$300k",
            "$1.5M",
        ]
        assert c.format_tokens(44.2e9) == "44.2B"

    def test_nice_ticks(self) -> None:
        assert nice_ticks(900_000) == [0, 200_000, 400_000, 600_000, 800_000, 1_000_000]
        assert nice_ticks(0) == [0.0, 1.0]


# ---------------------------------------------------------------- the command


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    """The command in a throwaway app; ApplianceError handled as `appliance.cli.main` does."""
    app = typer.Typer(add_completion=False)
    app.command("cost")(cost_command)

    @app.callback()
    def root() -> None:
        pass

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        try:
            app(args=["cost", *args], prog_name="appliance")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except ApplianceError as exc:
            print(f"error: {exc}")
            code = 1
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


class TestCommand:
    def test_table_and_default_chart(
        self, run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        r = run()
        assert r.code == 0, r.text
        for words in ("hardware", "power", "rack/colo", "staff", "total", "per 1M tokens"):
            assert words in r.text
        assert "$25,000" in r.text  # 5B tokens at $5 per 1M
        assert "pays for itself in 15.9 months" in r.text
        assert (tmp_path / "appliance-cost.html").is_file()

    def test_json_shape(self, run: Any, tmp_path: Path) -> None:
        chart = tmp_path / "c.html"
        r = run("--json", "--chart", str(chart), "--volume", "10B", "--workload", "3:1")
        assert r.code == 0, r.text
        data = json.loads(r.out)
        assert set(data) == {
            "inputs",
            "volume_tokens_month",
            "nodes",
            "capacity_tokens_month",
            "onprem",
            "cloud",
            "break_even",
            "chart",
        }
        assert data["volume_tokens_month"] == 1e10
        assert data["inputs"]["mean_input_tokens"] == 3
        assert set(data["onprem"]["monthly_usd"]) == {
            "hardware",
            "power",
            "colo",
            "cooling",
            "staff",
            "other",
            "total",
        }
        assert data["cloud"]["usd_per_mtok"] == pytest.approx(3.5)
        assert data["cloud"]["monthly_usd"] == pytest.approx(35_000)
        assert set(data["break_even"]) == {
            "volume_tokens_month",
            "nodes",
            "months",
            "within_hardware_life",
        }
        assert data["chart"] == str(chart)
        assert chart.is_file()

    def test_json_never_cheaper_is_null_and_no_chart(self, run: Any, tmp_path: Path) -> None:
        chart = tmp_path / "c.html"
        r = run(
            "--json", "--no-chart", "--chart", str(chart), "--price-in", "0", "--price-out", "0"
        )
        assert r.code == 0, r.text
        data = json.loads(r.out)
        assert data["break_even"]["volume_tokens_month"] is None
        assert data["break_even"]["months"] is None
        assert data["chart"] is None
        assert not chart.exists()

    def test_flags_override_the_inputs_file(self, run: Any, tmp_path: Path) -> None:
        f = tmp_path / "cost.toml"
        f.write_text('volume_tokens_month = "2B"\nutilization = 0.3\npue = 1.3\n')
        r = run("--inputs", str(f), "--utilization", "0.6", "--json", "--no-chart")
        assert r.code == 0, r.text
        got = json.loads(r.out)["inputs"]
        assert got["volume_tokens_month"] == 2e9
        assert got["utilization"] == 0.6
        assert got["pue"] == 1.3

    @pytest.mark.parametrize(
        ("args", "words"),
        [
            (["--utilization", "1.5"], "--utilization: Input should be less than or equal to 1"),
            (["--utilization", "0"], "--utilization: Input should be greater than 0"),
            (["--price-in", "-1"], "--price-in: Input should be greater than or equal to 0"),
            (["--pue", "0.9"], "--pue: Input should be greater than or equal to 1"),
            (["--nodes", "0"], "--nodes: Input should be greater than or equal to 1"),
            (["--throughput", "0"], "--throughput: Input should be greater than 0"),
            (["--workload", "0:100"], "--workload: Input should be greater than or equal to 1"),
        ],
    )
    def test_invalid_flags_are_named(self, run: Any, args: list[str], words: str) -> None:
        r = run("--no-chart", *args)
        assert r.code == 1
        assert words in r.text
        assert "docs/cost.md" in r.text

    @pytest.mark.parametrize(
        ("args", "flag"), [(["--volume", "5X"], "--volume"), (["--workload", "1k"], "--workload")]
    )
    def test_unparseable_flags_are_usage_errors(self, run: Any, args: list[str], flag: str) -> None:
        r = run("--no-chart", *args)
        assert r.code == 2
        assert flag in r.text

    def test_inputs_file_errors_name_file_and_key(self, run: Any, tmp_path: Path) -> None:
        f = tmp_path / "cost.toml"
        f.write_text('utilisation = 0.5\npue = 0.5\nvolume_tokens_month = "lots"\n')
        r = run("--no-chart", "--inputs", str(f))
        assert r.code == 1
        assert f"{f}: utilisation: unknown key" in r.text
        assert f"{f}: pue: Input should be greater than or equal to 1" in r.text
        assert f"{f}: volume_tokens_month: 'lots' is not a token count" in r.text

    def test_inputs_file_missing_or_not_toml(self, run: Any, tmp_path: Path) -> None:
        r = run("--no-chart", "--inputs", str(tmp_path / "nope.toml"))
        assert r.code == 1
        assert "no such cost inputs file" in r.text
        bad = tmp_path / "bad.toml"
        bad.write_text("pue = \n")
        r = run("--no-chart", "--inputs", str(bad))
        assert r.code == 1
        assert "not valid TOML" in r.text

    def test_unwritable_chart_path(self, run: Any, tmp_path: Path) -> None:
        r = run("--chart", str(tmp_path / "no" / "such" / "dir.html"))
        assert r.code == 1
        assert "cannot write the chart" in r.text

    def test_zero_volume_prints_a_dash_for_cost_per_token(self, run: Any) -> None:
        r = run("--no-chart", "--volume", "0")
        assert r.code == 0, r.text
        assert re.search(r"per 1M tokens at this volume\s+-\s+\$5\.00", r.out)


# ---------------------------------------------------------------- from the planner

CATALOG = load_catalog()
LLAMA_70B = "llama-3.3-70b-instruct"


class TestPlannedThroughput:
    def test_all_replicas_of_the_plan_at_the_workload_shape(self) -> None:
        # Two nodes: the planner's best group for 70B on 8xH100 is the whole node (TP8).
        entry, cluster = CATALOG.get(LLAMA_70B), Cluster.parse("2x8xH100-80GB")
        planned = c.planned_throughput(
            entry, cluster, inputs(mean_input_tokens=2048, mean_output_tokens=256)
        )
        report = evaluate(entry, cluster, workload=Workload(2048, 256))
        assert report.plan is not None and report.chosen is not None
        assert report.chosen.throughput is not None
        assert planned.plan == report.plan
        assert planned.replica_tok_s == report.chosen.throughput.output_tok_s
        assert planned.tok_s == pytest.approx(planned.replica_tok_s * report.plan.replicas)
        assert report.plan.replicas > 1  # the sum is over replicas, not one group
        assert planned.nodes == 2
        assert planned.workload == Workload(2048, 256)

    def test_nodes_are_those_the_replicas_occupy(self) -> None:
        one = c.planned_throughput(CATALOG.get(LLAMA_70B), Cluster.parse("8xH100-80GB"), inputs())
        two = c.planned_throughput(CATALOG.get(LLAMA_70B), Cluster.parse("2x8xH100-80GB"), inputs())
        assert (one.nodes, two.nodes) == (1, 2)
        assert two.tok_s == pytest.approx(2 * one.tok_s)

    def test_the_configured_memory_fraction_sizes_the_plan(self) -> None:
        # 70B fp8 on one H200 is KV-bound: a smaller engines.vllm.gpu_memory_fraction holds
        # fewer sequences, so the plan that is priced serves less.
        entry, cluster = CATALOG.get(LLAMA_70B), Cluster.parse("1xH200")
        full = c.planned_throughput(entry, cluster, inputs())
        config = ApplianceConfig.model_validate({"engines": {"vllm": {"gpu_memory_fraction": 0.6}}})
        fractions = config.engines.memory_fractions()
        assert fractions == {"vllm": 0.6, "trtllm": 0.9}
        small = c.planned_throughput(entry, cluster, inputs(), fractions)
        assert small.replica_tok_s < full.replica_tok_s

    def test_nothing_fits_is_the_planners_error(self) -> None:
        with pytest.raises(PlanError, match="does not fit on 1xL40S") as info:
            c.planned_throughput(CATALOG.get(LLAMA_70B), Cluster.parse("1xL40S"), inputs())
        assert info.value.hint and "What would fit" in info.value.hint

    def test_the_cpu_engine_has_no_prediction(self) -> None:
        with pytest.raises(CostError, match="no throughput for tiny-random-llama") as info:
            c.planned_throughput(CATALOG.get("tiny-random-llama"), Cluster.cpu_only(), inputs())
        assert info.value.hint and "--throughput" in info.value.hint


class TestCommandWithModel:
    @pytest.fixture(autouse=True)
    def _no_config(self, appliance_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("appliance.config.SEARCH_PATHS", (Path("appliance.toml"),))

    def _planned(self, gpus: str, **kw: Any) -> c.PlannedThroughput:
        return c.planned_throughput(CATALOG.get(LLAMA_70B), Cluster.parse(gpus), inputs(**kw))

    def test_says_where_the_throughput_comes_from(self, run: Any) -> None:
        r = run("--no-chart", "--model", LLAMA_70B, "--gpus", "8xH100-80GB")
        assert r.code == 0, r.text
        planned = self._planned("8xH100-80GB")
        p = planned.plan
        assert f"Throughput: {planned.tok_s:,.0f} output tok/s" in r.text
        assert f"the planner's prediction for {LLAMA_70B} on 8xH100-80GB" in r.text
        assert f"{p.replicas} replica(s) of {p.gpus_per_replica} H100-80GB" in r.text
        assert f"{p.precision}" in r.text and f"TP{p.tensor_parallel}" in r.text
        assert "per 1M tokens at this volume" in r.text

    def test_json_carries_the_plan_and_uses_its_throughput(self, run: Any) -> None:
        args = ["--model", LLAMA_70B, "--gpus", "2x8xH100-80GB", "--workload", "2048:256"]
        r = run("--json", "--no-chart", *args)
        assert r.code == 0, r.text
        data = json.loads(r.out)
        planned = self._planned("2x8xH100-80GB", mean_input_tokens=2048, mean_output_tokens=256)
        assert data["inputs"]["throughput_tok_s"] == pytest.approx(planned.tok_s)
        assert data["inputs"]["nodes"] == 2
        assert data["planner"]["model"] == LLAMA_70B
        assert data["planner"]["gpus"] == "2x8xH100-80GB"
        assert data["planner"]["workload"] == {"input_tokens": 2048, "output_tokens": 256}
        assert data["planner"]["plan"]["replicas"] == planned.plan.replicas
        assert data["planner"]["throughput_tok_s"] == pytest.approx(planned.tok_s)

    def test_throughput_and_nodes_flags_win(self, run: Any) -> None:
        base = ["--json", "--no-chart", "--model", LLAMA_70B, "--gpus", "2x8xH100-80GB"]
        data = json.loads(run(*base, "--throughput", "5000").out)
        assert data["inputs"]["throughput_tok_s"] == 5000
        assert data["inputs"]["nodes"] == 1
        assert "planner" not in data
        data = json.loads(run(*base, "--nodes", "4").out)
        assert data["inputs"]["nodes"] == 4
        assert data["planner"]["nodes"] == 2

    def test_default_gpus_are_this_hosts(self, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(
            "appliance.control.cluster.local_cluster", lambda _: Cluster.parse("8xH200")
        )
        r = run("--no-chart", "--model", LLAMA_70B)
        assert r.code == 0, r.text
        assert f"{LLAMA_70B} on 8xH200" in r.text

    def test_no_gpus_here_points_at_the_gpus_flag(
        self, run: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("appliance.control.cluster.local_cluster", lambda _: Cluster.cpu_only())
        r = run("--no-chart", "--model", LLAMA_70B)
        assert r.code == 1
        assert "needs GPUs and this cluster has none" in r.text
        assert "--gpus 8xH100-80GB" in r.text

    def test_does_not_fit_and_unknown_model_are_errors(self, run: Any) -> None:
        r = run("--no-chart", "--model", LLAMA_70B, "--gpus", "1xL40S")
        assert r.code == 1
        assert "does not fit on 1xL40S" in r.text
        r = run("--no-chart", "--model", "no-such-model", "--gpus", "8xH100-80GB")
        assert r.code == 1
        assert "unknown model 'no-such-model'" in r.text

    @pytest.mark.parametrize(
        ("args", "words"),
        [
            (["--gpus", "8xH100-80GB"], "only used with --model"),
            (["--model", LLAMA_70B, "--gpus", "8xNOPE"], "unknown GPU type 'NOPE'"),
        ],
    )
    def test_gpus_usage_errors(self, run: Any, args: list[str], words: str) -> None:
        r = run("--no-chart", *args)
        assert r.code == 2
        assert "--gpus" in r.text
        assert words in r.text


class TestChart:
    def _svgs(self, html: str) -> list[ET.Element]:
        # Each chart must be well-formed XML, as a browser's SVG parser would insist.
        return [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", html, re.S)]

    def test_both_series_and_the_break_even_markers(self, run: Any, tmp_path: Path) -> None:
        chart = tmp_path / "c.html"
        assert run("--chart", str(chart)).code == 0
        html = chart.read_text()
        svgs = self._svgs(html)
        assert len(svgs) == 2
        ns = "{http://www.w3.org/2000/svg}"
        for svg in svgs:
            series = {p.get("data-series") for p in svg.iter(f"{ns}polyline")}
            assert series == {"on-prem", "cloud API"}
            marks = [g for g in svg.iter(f"{ns}g") if g.get("class") == "break-even"]
            assert len(marks) == 1
            assert marks[0].find(f"{ns}circle") is not None
        assert "break-even: month 15.9" in html
        assert "break-even: 2.88B tokens/mo" in html

    def test_never_cheaper_chart_says_so_and_marks_nothing(self) -> None:
        report = c.analyze(inputs(price_input_usd_per_mtok=0.05, price_output_usd_per_mtok=0.1))
        html = render_html(report)
        assert 'class="break-even"' not in html
        assert "on-prem is never cheaper at these inputs" in html
        assert "the hardware never pays back at this volume" in html
        assert len(self._svgs(html)) == 2

    def test_on_prem_steps_up_a_node_at_a_time(self) -> None:
        report = c.analyze(inputs(volume_tokens_month=120e9))
        svg = self._svgs(render_html(report))[1]
        onprem = next(
            p
            for p in svg.iter("{http://www.w3.org/2000/svg}polyline")
            if p.get("data-series") == "on-prem"
        )
        points = [tuple(map(float, pt.split(","))) for pt in (onprem.get("points") or "").split()]
        # 180B tokens on the axis at 44.2B a node: one to five nodes, so four vertical jumps
        # (SVG y grows downwards: a jump up is a smaller y at the same x).
        jumps = sum(1 for a, b in pairwise(points) if a[0] == b[0] and b[1] < a[1])
        assert jumps == 4
