"""Break-even between serving on-prem and paying a cloud API per token.

The arithmetic operators do on a whiteboard, as pure functions of one validated set of
inputs (`CostInputs`):

    cloud    = volume x blended price per token (input and output priced separately)
    on-prem  = hardware (capex / amortization months) + power (kW x load x PUE x $/kWh)
             + rack/colo ($/kW reserved) + separate cooling + staff (FTE x loaded salary)
             + other
    capacity = throughput x seconds per month x utilization, per node

On-prem is sized in whole nodes: a volume above what the deployment serves at the target
utilization buys another node. Two break-evens come out of it: the monthly volume above which
on-prem (amortized) is cheaper, and the months until the hardware bought up front has paid
for itself at a given volume. At exactly the break-even volume the payback time equals the
amortization period, which is what ties the two together.

`throughput_tok_s` is output (generated) tokens per second of the whole deployment at the
workload shape `mean_input_tokens:mean_output_tokens`, the way published benchmarks and the
planner report it; the input tokens of those requests are processed alongside. Feed it from
a measurement with ``inputs.with_throughput(measured_tok_s)``, or from the planner with
``planned_throughput(entry, cluster, inputs)``, which runs the plan `appliance plan` would
show at the same workload shape.

Every default below is cited where it is set; docs/cost.md has the same table with dates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError

from appliance.catalog import ModelEntry
from appliance.errors import CostError, PlanError
from appliance.placement import Cluster
from appliance.planner import Plan, Workload, evaluate
from appliance.strict import Strict, problems, read_toml

HOURS_PER_MONTH = 8760 / 12  # 730: the average month, as colo and power bills use
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
MILLION = 1_000_000


_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_TOKENS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")


def parse_tokens(value: object) -> float:
    """A token count: a number, or text such as 5B, 300M, 2.5e9, 750k."""
    if isinstance(value, bool):
        raise ValueError("expected a token count such as 5B or 300M")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _TOKENS.match(value.replace("_", "").replace(",", ""))
        if m:
            return float(m.group(1)) * _SUFFIXES[m.group(2).upper()]
        raise ValueError(f"{value!r} is not a token count such as 5B, 300M or 2.5e9")
    raise ValueError("expected a token count such as 5B or 300M")


def parse_workload(value: str) -> tuple[int, int]:
    """'IN:OUT' mean tokens per request, as `appliance plan --workload` takes it."""
    parts = value.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        tokens_in, tokens_out = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(
            f"{value!r} is not IN:OUT mean tokens per request, e.g. 1000:1000"
        ) from None
    return tokens_in, tokens_out


TokenCount = Annotated[float, BeforeValidator(parse_tokens)]


class CostInputs(Strict):
    """Everything the comparison depends on; a TOML file passed with --inputs uses these keys."""

    # --- demand and the cloud alternative ---
    # An example volume, not a source: pass your own (the gateway's usage records count it).
    volume_tokens_month: TokenCount = Field(
        5e9, ge=0, le=1e18, description="Tokens per month, input plus output."
    )
    # The shape of the TensorRT-LLM benchmark the default throughput comes from (ISL/OSL).
    mean_input_tokens: int = Field(
        1000, ge=1, le=10_000_000, description="Mean input tokens per request."
    )
    mean_output_tokens: int = Field(
        1000, ge=1, le=10_000_000, description="Mean output tokens per request."
    )
    # OpenAI GPT-4.1 list price, USD per 1M tokens: $2.00 input, $8.00 output
    # (openai.com/api/pricing, unchanged since its launch on 2025-04-14; checked 2026-11).
    price_input_usd_per_mtok: float = Field(
        2.00, ge=0, le=10_000, description="Cloud price per 1M input tokens (USD)."
    )
    price_output_usd_per_mtok: float = Field(
        8.00, ge=0, le=10_000, description="Cloud price per 1M output tokens (USD)."
    )

    # --- the deployment ---
    # TensorRT-LLM performance overview (docs/source/performance/perf-overview.md, v1.0):
    # Llama 3.3 70B FP8 on two H100 SXM (TP2), ISL/OSL 1000/1000: 4,205 output tokens/s.
    # An 8-GPU node holds four such groups: 4 x 4,205 = 16,820. Offline maximum throughput;
    # interactive serving under a latency target gets less, which utilization absorbs.
    throughput_tok_s: float = Field(
        16_820.0,
        gt=0,
        le=1e9,
        description="Output tokens/s the whole deployment sustains at the workload shape "
        "(planner prediction or measurement).",
    )
    # Assumption: average load over a month (nights, weekends, headroom for peaks).
    utilization: float = Field(
        0.5, gt=0, le=1, description="Average fraction of the throughput actually used."
    )
    nodes: int = Field(
        1, ge=1, le=100_000, description="Nodes the throughput figure is for (the minimum bought)."
    )
    # 8x H100 SXM HGX server with InfiniBand NICs: Thinkmate quote about $317k (2024-08);
    # SemiAnalysis put a DGX H100's sale price near $270k (2023-05). No public H200 list
    # price was found: use your quote.
    node_capex_usd: float = Field(
        300_000.0, ge=0, le=1e9, description="Purchase price of one node, installed (USD)."
    )
    # Assumption: 3 years, conservative next to the 5-6 years hyperscalers depreciate
    # servers over, because a new GPU generation arrives about every two years.
    amortization_months: int = Field(
        36, ge=1, le=240, description="Months the hardware is written off over."
    )

    # --- power, cooling, space ---
    # NVIDIA DGX H100/H200 user guide: system power ~10.2 kW max (six 3.3 kW PSUs, 4+2).
    node_power_kw: float = Field(10.2, gt=0, le=1000, description="Node power at full load (kW).")
    # Assumption: an idle H100 SXM draws roughly a tenth of its 700 W, but CPUs, fans, NICs
    # and NVSwitches keep drawing; read it off your PDUs.
    idle_power_fraction: float = Field(
        0.25, ge=0, le=1, description="Node power when idle, as a fraction of full load."
    )
    # Uptime Institute Global Data Center Survey: industry average PUE 1.58 in 2023 (1.55-1.59
    # since 2020); new large facilities reach 1.3 or better (2024 survey).
    pue: float = Field(
        1.5,
        ge=1,
        le=4,
        description="Power usage effectiveness: facility power / IT power "
        "(cooling energy is in here).",
    )
    # EIA Electric Power Monthly: US average retail price to industrial customers 8.06 cents
    # per kWh in 2023 (commercial customers pay about 12-13).
    power_usd_per_kwh: float = Field(
        0.08, ge=0, le=10, description="Electricity price (USD per kWh)."
    )
    # CBRE North America Data Center Trends H2 2024 (2025-02-26): average asking rate
    # $184.06 per kW per month for 250-500 kW in primary markets; energy is metered on top.
    colo_usd_per_kw_month: float = Field(
        184.06,
        ge=0,
        le=100_000,
        description="Rack/colo space per kW reserved, per month (USD); reserved kW = node power.",
    )
    cooling_usd_per_node_month: float = Field(
        0.0,
        ge=0,
        le=1e7,
        description="Cooling paid apart from PUE, per node per month (USD), e.g. a rear-door "
        "heat exchanger lease.",
    )

    # --- people and the rest ---
    # Assumption: the appliance automates install and upgrades; a quarter of one engineer.
    staff_fte: float = Field(
        0.25, ge=0, le=10_000, description="Full-time engineers the deployment takes."
    )
    # BLS OEWS May 2024: median software developer wage $133,080; wages are about 70% of
    # employer compensation cost (BLS ECEC), so about $190,000 loaded.
    staff_loaded_usd_year: float = Field(
        190_000.0, ge=0, le=1e8, description="Loaded cost of one engineer per year (USD)."
    )
    other_usd_month: float = Field(
        0.0,
        ge=0,
        le=1e9,
        description="Anything else per month (USD): support contracts, licences, network.",
    )

    def with_throughput(self, tok_s: float, nodes: int | None = None) -> CostInputs:
        """These inputs with another throughput (the planner's prediction, a measurement)
        and, when given, the number of nodes it is for; validated like the rest."""
        changed: dict[str, Any] = {"throughput_tok_s": tok_s}
        if nodes is not None:
            changed["nodes"] = nodes
        return CostInputs.model_validate({**self.model_dump(), **changed})


# ---------------------------------------------------------------- arithmetic


def blended_usd_per_token(i: CostInputs) -> float:
    """Cloud price of one token at the workload's input/output mix."""
    total = i.mean_input_tokens + i.mean_output_tokens
    per_mtok = (
        i.mean_input_tokens * i.price_input_usd_per_mtok
        + i.mean_output_tokens * i.price_output_usd_per_mtok
    ) / total
    return per_mtok / MILLION


def node_full_tokens_month(i: CostInputs) -> float:
    """Tokens (input plus output) one node serves in a month at 100% load."""
    tokens_per_output = (i.mean_input_tokens + i.mean_output_tokens) / i.mean_output_tokens
    return i.throughput_tok_s / i.nodes * tokens_per_output * SECONDS_PER_MONTH


def node_capacity_tokens_month(i: CostInputs) -> float:
    """Tokens one node serves in a month at the target utilization."""
    return node_full_tokens_month(i) * i.utilization


def nodes_for(i: CostInputs, volume: float) -> int:
    """Whole nodes needed for `volume` tokens a month: never fewer than `i.nodes`."""
    needed = math.ceil(volume / node_capacity_tokens_month(i) * (1 - 1e-12))
    return max(i.nodes, needed)


@dataclass(frozen=True)
class MonthlyCost:
    """On-prem cost of one month, by component (USD)."""

    hardware: float
    power: float
    colo: float
    cooling: float
    staff: float
    other: float

    @property
    def total(self) -> float:
        return self.hardware + self.power + self.colo + self.cooling + self.staff + self.other

    @property
    def running(self) -> float:
        """Everything but the hardware: what keeps costing once the hardware is paid."""
        return self.total - self.hardware

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _kwh_usd(i: CostInputs) -> float:
    """Cost of one kWh drawn by the IT equipment, facility overhead included."""
    return i.pue * i.power_usd_per_kwh


def _node_fixed_month(i: CostInputs) -> float:
    """What each node costs a month whatever it serves: hardware, space, cooling, idle power."""
    idle_power = i.node_power_kw * i.idle_power_fraction * HOURS_PER_MONTH * _kwh_usd(i)
    return (
        i.node_capex_usd / i.amortization_months
        + i.colo_usd_per_kw_month * i.node_power_kw
        + i.cooling_usd_per_node_month
        + idle_power
    )


def _shared_month(i: CostInputs) -> float:
    """What the deployment costs a month however many nodes it has: staff and other."""
    return i.staff_fte * i.staff_loaded_usd_year / 12 + i.other_usd_month


def _energy_usd_per_token(i: CostInputs) -> float:
    """Power above idle that one more token costs."""
    busy_kw = i.node_power_kw * (1 - i.idle_power_fraction)
    return busy_kw * HOURS_PER_MONTH * _kwh_usd(i) / node_full_tokens_month(i)


def onprem_monthly(i: CostInputs, volume: float, nodes: int | None = None) -> MonthlyCost:
    """On-prem cost of a month serving `volume` tokens on `nodes` (default: as many as needed)."""
    k = nodes_for(i, volume) if nodes is None else nodes
    busy = min(1.0, volume / (k * node_full_tokens_month(i)))
    load = i.idle_power_fraction + (1 - i.idle_power_fraction) * busy
    return MonthlyCost(
        hardware=k * i.node_capex_usd / i.amortization_months,
        power=k * i.node_power_kw * load * HOURS_PER_MONTH * _kwh_usd(i),
        colo=k * i.node_power_kw * i.colo_usd_per_kw_month,
        cooling=k * i.cooling_usd_per_node_month,
        staff=i.staff_fte * i.staff_loaded_usd_year / 12,
        other=i.other_usd_month,
    )


def cloud_monthly(i: CostInputs, volume: float) -> float:
    return volume * blended_usd_per_token(i)


def break_even_volume(i: CostInputs) -> tuple[float, int] | None:
    """The lowest monthly volume at which on-prem (amortized) costs no more than the cloud,
    and the nodes it takes; None when no volume does.

    With k nodes, on-prem costs k*A + S + e*V and the cloud p*V, so they meet at
    V = (k*A + S) / (p - e), which k nodes can serve when S <= k*(cap*(p - e) - A).
    Past each node's capacity the next node adds A at once, so just above those steps the
    cloud can be cheaper again for a while; the volume chart shows the steps.
    """
    p = blended_usd_per_token(i)
    e = _energy_usd_per_token(i)
    a = _node_fixed_month(i)
    s = _shared_month(i)
    gain_per_node = node_capacity_tokens_month(i) * (p - e) - a
    if p <= e or gain_per_node <= 0:
        return None
    k = max(i.nodes, math.ceil(s / gain_per_node))
    return (k * a + s) / (p - e), k


def break_even_months(i: CostInputs, volume: float) -> float | None:
    """Months until the hardware bought up front has paid for itself at `volume`, or None."""
    running = onprem_monthly(i, volume).running
    saving = cloud_monthly(i, volume) - running
    if saving <= 0:
        return None
    return nodes_for(i, volume) * i.node_capex_usd / saving


def cumulative_usd(i: CostInputs, volume: float, month: float) -> tuple[float, float]:
    """(on-prem, cloud) spent after `month` months: hardware paid up front, no re-buy."""
    k = nodes_for(i, volume)
    onprem = k * i.node_capex_usd + onprem_monthly(i, volume).running * month
    return onprem, cloud_monthly(i, volume) * month


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class CostReport:
    inputs: CostInputs
    nodes: int  # bought for the volume
    capacity_tokens_month: float  # what those nodes serve at the target utilization
    onprem: MonthlyCost  # at the volume
    cloud_usd_month: float
    cloud_usd_per_mtok: float  # blended at the workload mix
    onprem_usd_per_mtok: float | None  # at the volume; None at zero volume
    onprem_usd_per_mtok_at_utilization: float  # the base deployment, loaded to `utilization`
    node_usd_per_mtok: float  # one node at `utilization`, staff and other left out
    break_even_volume: float | None
    break_even_nodes: int | None
    break_even_months: float | None

    @property
    def pays_back_within_life(self) -> bool:
        m = self.break_even_months
        return m is not None and m <= self.inputs.amortization_months

    def to_dict(self) -> dict[str, Any]:
        i = self.inputs
        return {
            "inputs": i.model_dump(),
            "volume_tokens_month": i.volume_tokens_month,
            "nodes": self.nodes,
            "capacity_tokens_month": self.capacity_tokens_month,
            "onprem": {
                "monthly_usd": self.onprem.to_dict(),
                "usd_per_mtok": self.onprem_usd_per_mtok,
                "usd_per_mtok_at_utilization": self.onprem_usd_per_mtok_at_utilization,
                "node_usd_per_mtok": self.node_usd_per_mtok,
                "capex_usd": self.nodes * i.node_capex_usd,
            },
            "cloud": {
                "monthly_usd": self.cloud_usd_month,
                "usd_per_mtok": self.cloud_usd_per_mtok,
            },
            "break_even": {
                "volume_tokens_month": self.break_even_volume,
                "nodes": self.break_even_nodes,
                "months": self.break_even_months,
                "within_hardware_life": self.pays_back_within_life,
            },
        }


def analyze(i: CostInputs) -> CostReport:
    volume = i.volume_tokens_month
    full_volume = i.nodes * node_capacity_tokens_month(i)
    cap = node_capacity_tokens_month(i)
    node_at_cap = _node_fixed_month(i) + _energy_usd_per_token(i) * cap
    crossing = break_even_volume(i)
    k = nodes_for(i, volume)
    onprem = onprem_monthly(i, volume)
    return CostReport(
        inputs=i,
        nodes=k,
        capacity_tokens_month=k * cap,
        onprem=onprem,
        cloud_usd_month=cloud_monthly(i, volume),
        cloud_usd_per_mtok=blended_usd_per_token(i) * MILLION,
        onprem_usd_per_mtok=onprem.total / volume * MILLION if volume > 0 else None,
        onprem_usd_per_mtok_at_utilization=(
            onprem_monthly(i, full_volume).total / full_volume * MILLION
        ),
        node_usd_per_mtok=node_at_cap / cap * MILLION,
        break_even_volume=crossing[0] if crossing else None,
        break_even_nodes=crossing[1] if crossing else None,
        break_even_months=break_even_months(i, volume),
    )


# ---------------------------------------------------------------- from the planner


@dataclass(frozen=True)
class PlannedThroughput:
    """What the planner predicts a model serves on some GPUs, and the plan behind the figure."""

    model: str
    gpus: str  # the cluster planned for, as --gpus spells it
    workload: Workload
    plan: Plan
    replica_tok_s: float  # output tokens/s of one replica at the workload shape
    nodes: int  # nodes the replicas occupy: what the throughput is for

    @property
    def tok_s(self) -> float:
        """Output tokens/s of all the replicas: the deployment's `throughput_tok_s`."""
        return self.replica_tok_s * self.plan.replicas

    def describe(self) -> str:
        """Where the throughput comes from, in one sentence."""
        p, w = self.plan, self.workload
        group = f"TP{p.tensor_parallel}" + (
            f" x PP{p.pipeline_parallel}" if p.pipeline_parallel > 1 else ""
        )
        return (
            f"Throughput: {self.tok_s:,.0f} output tok/s, the planner's prediction for "
            f"{self.model} on {self.gpus} at {w.input_tokens}:{w.output_tokens} tokens in:out "
            f"({p.engine}, {p.precision}, {p.replicas} replica(s) of {p.gpus_per_replica} "
            f"{p.gpu} in {group} at {self.replica_tok_s:,.0f} tok/s each, on "
            f"{self.nodes} node{'s' if self.nodes > 1 else ''})."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpus": self.gpus,
            "workload": asdict(self.workload),
            "plan": self.plan.to_dict(),
            "replica_tok_s": self.replica_tok_s,
            "throughput_tok_s": self.tok_s,
            "nodes": self.nodes,
        }


def planned_throughput(
    entry: ModelEntry,
    cluster: Cluster,
    i: CostInputs,
    memory_fraction: Mapping[str, float] | None = None,
) -> PlannedThroughput:
    """The throughput the planner predicts for `entry` on `cluster` at the workload shape of
    `i`, all replicas together: the plan `appliance plan --workload IN:OUT` shows.
    `memory_fraction`: engines.<name>.gpu_memory_fraction (EnginesConfig.memory_fractions).

    PlanError when nothing fits; CostError when the plan has no prediction (a CPU plan).
    """
    workload = Workload(i.mean_input_tokens, i.mean_output_tokens)
    report = evaluate(entry, cluster, workload=workload, memory_fraction=memory_fraction)
    if report.plan is None:
        raise PlanError(report.problem or f"no plan for {entry.name}", hint=report.hint)
    chosen = report.chosen
    if chosen is None or chosen.throughput is None:
        raise CostError(
            f"the planner predicts no throughput for {entry.name} on the "
            f"{report.plan.engine} engine",
            hint="Measure it and pass it with --throughput.",
        )
    return PlannedThroughput(
        model=entry.name,
        gpus=cluster.describe(),
        workload=workload,
        plan=report.plan,
        replica_tok_s=chosen.throughput.output_tok_s,
        nodes=len(report.plan.gpus_per_node()),
    )


# ---------------------------------------------------------------- inputs


def load_inputs(
    path: Path | None, overrides: Mapping[str, Any], names: Mapping[str, str]
) -> CostInputs:
    """Defaults, then the TOML file at `path`, then `overrides` (values that are not None).

    Errors name the field the way the person wrote it: `names[field]` (a flag) for an
    override, `FILE: field` for the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data.update(read_toml(path, CostError, "cost inputs file"))
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return CostInputs.model_validate(data)
    except ValidationError as exc:
        flags = {field: names.get(field, field) for field in given}
        lines = problems(exc, CostInputs, path or "cost inputs", given=flags)
        raise CostError(
            "\n".join(lines),
            hint="Fix the values named above; docs/cost.md lists every input, its bounds "
            "and where its default comes from.",
        ) from None


# ---------------------------------------------------------------- formatting


def format_usd(x: float) -> str:
    """$1.23M, $250k, $8,333, $0.33: short enough for a table cell or an axis."""
    a = abs(x)
    if a >= 1e6:
        return f"${x / 1e6:,.3g}M" if a < 1e9 else f"${x / 1e9:,.3g}B"
    if a >= 100_000:
        return f"${x / 1e3:,.0f}k"
    if a >= 100 or a == 0:
        return f"${x:,.0f}"
    if a >= 1:
        return f"${x:,.2f}"
    if a >= 0.01:  # cents, with a third digit where it says something: $0.10, $0.333
        text = f"{x:.3f}"
        return "$" + (text[:-1] if text.endswith("0") else text)
    return f"${x:.3g}"


def format_tokens(x: float) -> str:
    """5B, 300M, 44.2B, 750k."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.3g}{suffix}"
    return f"{x:.3g}"
