"""The cost comparison as one self-contained HTML page with inline SVG charts.

Two charts: cumulative spend over months (hardware bought up front against paying the API
as you go, the payback month marked) and monthly cost against monthly volume (on-prem in
whole-node steps, the break-even volume marked). No JavaScript, no external files, no
plotting library: a browser, a mail client or a wiki can show it as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from html import escape
from pathlib import Path

from appliance.cost import (
    CostInputs,
    CostReport,
    cloud_monthly,
    cumulative_usd,
    format_tokens,
    format_usd,
    node_capacity_tokens_month,
    onprem_monthly,
)
from appliance.errors import CostError

ONPREM = "#1f5fa8"  # blue and orange stay apart for the common colour-vision deficiencies
CLOUD = "#e07b00"
MARK = "#222222"
GRID = "#e3e3e3"

WIDTH, HEIGHT = 760, 380
LEFT, RIGHT, TOP, BOTTOM = 78, 24, 40, 52

HEADROOM = 1.12  # room above the highest line for the labels drawn at the top

Point = tuple[float, float]


def axis_usd(x: float) -> str:
    """$0, $500, $40k, $1.2M: axis labels stay short."""
    if abs(x) >= 1e6:
        return f"${x / 1e6:g}M"
    if abs(x) >= 1e3:
        return f"${x / 1e3:g}k"
    return f"${x:g}"


def month_ticks(months: float) -> list[float]:
    """Quarters, half-years or years, whichever gives at most about eight ticks."""
    step = next(s for s in (3, 6, 12, 24, 60) if months / s <= 8)
    return [float(m) for m in range(0, int(months) + 1, step)]


def nice_ticks(hi: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 x 10^n) up to at least `hi`."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    n = math.ceil(hi / step - 1e-9)
    return [k * step for k in range(n + 1)]


@dataclass(frozen=True)
class Axes:
    x_max: float
    y_max: float

    def x(self, v: float) -> float:
        return LEFT + v / self.x_max * (WIDTH - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return HEIGHT - BOTTOM - v / self.y_max * (HEIGHT - TOP - BOTTOM)

    def path(self, points: Sequence[Point]) -> str:
        return " ".join(f"{self.x(px):.1f},{self.y(py):.1f}" for px, py in points)


def _frame(
    axes: Axes,
    x_ticks: list[float],
    y_ticks: list[float],
    x_label: Callable[[float], str],
    x_title: str,
) -> list[str]:
    out = []
    for t in y_ticks:
        y = axes.y(t)
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(axis_usd(t))}</text>'
        )
    base = HEIGHT - BOTTOM
    for t in x_ticks:
        x = axes.x(t)
        out.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 5}" stroke="#888"/>')
        out.append(
            f'<text x="{x:.1f}" y="{base + 19}" text-anchor="middle">{escape(x_label(t))}</text>'
        )
    out.append(f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" stroke="#888"/>')
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#888"/>')
    out.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 10}" text-anchor="middle" '
        f'class="axis-title">{escape(x_title)}</text>'
    )
    return out


def _series(axes: Axes, name: str, css: str, color: str, points: Sequence[Point]) -> str:
    return (
        f'<polyline class="series {css}" data-series="{escape(name)}" fill="none" '
        f'stroke="{color}" stroke-width="2.5" stroke-linejoin="round" '
        f'points="{axes.path(points)}"/>'
    )


def _legend(onprem: str, cloud: str) -> str:
    """One row above the plot, where it can hide nothing."""
    out, x = [], float(LEFT)
    for label, color in ((onprem, ONPREM), (cloud, CLOUD)):
        out.append(
            f'<line x1="{x:.0f}" y1="14" x2="{x + 22:.0f}" y2="14" stroke="{color}" '
            f'stroke-width="3"/><text x="{x + 28:.0f}" y="18">{escape(label)}</text>'
        )
        x += 28 + 6.6 * len(label) + 28  # about 6.6 px a character at 12 px
    return f'<g class="legend">{"".join(out)}</g>'


def _marker(axes: Axes, x: float, y: float, label: str, css: str) -> str:
    """A dot on the crossing, a dashed drop line to the axis and a label that stays inside."""
    px, py = axes.x(x), axes.y(y)
    right_side = px < (LEFT + WIDTH - RIGHT) / 2
    anchor = "start" if right_side else "end"
    tx = px + 10 if right_side else px - 10
    # Below the dot unless that would run into the axis labels.
    ty = py - 12 if py > HEIGHT - BOTTOM - 40 else py + 18
    return (
        f'<g class="{css}">'
        f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{px:.1f}" y2="{HEIGHT - BOTTOM}" stroke="{MARK}" '
        f'stroke-dasharray="4 3"/>'
        f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5.5" fill="white" stroke="{MARK}" '
        f'stroke-width="2"/>'
        f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" class="mark">'
        f"{escape(label)}</text></g>"
    )


def _vline(axes: Axes, x: float, label: str, css: str) -> str:
    px = axes.x(x)
    room_left = px - LEFT > 7 * len(label)
    tx, anchor = (px - 6, "end") if room_left else (px + 6, "start")
    return (
        f'<g class="{css}"><line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{HEIGHT - BOTTOM}" '
        f'stroke="#999" stroke-dasharray="2 4"/>'
        f'<text x="{tx:.1f}" y="{TOP + 12}" text-anchor="{anchor}" class="note">{escape(label)}'
        f"</text></g>"
    )


def _note(text: str) -> str:
    """A remark in the plot's top right corner (what the chart cannot show)."""
    return (
        f'<text x="{WIDTH - RIGHT - 6}" y="{TOP + 30}" text-anchor="end" class="mark">'
        f"{escape(text)}</text>"
    )


def _svg(body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def cumulative_chart(report: CostReport) -> str:
    """Spend since day one: on-prem starts at the hardware price, the API at zero."""
    i = report.inputs
    volume = i.volume_tokens_month
    months = float(i.amortization_months)
    payback = report.break_even_months
    if payback is not None and payback > 0.85 * months:
        months = min(math.ceil(payback * 1.2), 3 * i.amortization_months)
    onprem = [
        (0.0, cumulative_usd(i, volume, 0)[0]),
        (months, cumulative_usd(i, volume, months)[0]),
    ]
    cloud = [(0.0, 0.0), (months, cumulative_usd(i, volume, months)[1])]
    y_ticks = nice_ticks(HEADROOM * max(onprem[1][1], cloud[1][1]))
    axes = Axes(months, y_ticks[-1])
    x_ticks = month_ticks(months)
    body = _frame(axes, x_ticks, y_ticks, lambda t: f"{t:g}", "months from purchase")
    if months > i.amortization_months:
        body.append(
            _vline(axes, i.amortization_months, f"hardware life {i.amortization_months} mo", "life")
        )
    body.append(_series(axes, "on-prem", "onprem", ONPREM, onprem))
    body.append(_series(axes, "cloud API", "cloud", CLOUD, cloud))
    if payback is None:
        body.append(_note("the hardware never pays back at this volume"))
    elif payback > months:
        body.append(_note(f"break-even at month {payback:,.0f}, beyond this chart"))
    else:
        spent = cumulative_usd(i, volume, payback)[1]
        body.append(
            _marker(
                axes,
                payback,
                spent,
                f"break-even: month {payback:.1f} ({format_usd(spent)})",
                "break-even",
            )
        )
    body.append(
        _legend(
            f"on-prem: {format_usd(onprem[0][1])} up front + "
            f"{format_usd(report.onprem.running)}/mo",
            f"cloud API: {format_usd(report.cloud_usd_month)}/mo",
        )
    )
    return _svg(body, "Cumulative cost over months, on-prem against the cloud API")


def _onprem_steps(i: CostInputs, x_max: float) -> list[Point]:
    """On-prem monthly cost from zero to `x_max`: linear within a node count, a step at each
    node's capacity."""
    cap = node_capacity_tokens_month(i)
    points: list[Point] = []
    start = 0.0
    k = i.nodes
    while start < x_max:
        end = min(k * cap, x_max)
        points.append((start, onprem_monthly(i, start, k).total))
        points.append((end, onprem_monthly(i, end, k).total))
        start, k = end, k + 1
        if len(points) > 400:  # thousands of nodes on one axis: the steps are invisible anyway
            points.append((x_max, onprem_monthly(i, x_max).total))
            break
    return points


def volume_chart(report: CostReport) -> str:
    """Monthly cost against monthly volume: where the two lines cross is the break-even."""
    i = report.inputs
    volume = i.volume_tokens_month
    crossing = report.break_even_volume or 0.0
    x_max = 1.5 * max(volume, crossing)
    if x_max <= 0:
        x_max = i.nodes * node_capacity_tokens_month(i)
    onprem = _onprem_steps(i, x_max)
    cloud = [(0.0, 0.0), (x_max, cloud_monthly(i, x_max))]
    y_ticks = nice_ticks(HEADROOM * max(max(p[1] for p in onprem), cloud[1][1]))
    axes = Axes(x_max, y_ticks[-1])
    x_ticks = [t for t in nice_ticks(x_max, 6) if t <= x_max * 1.0001]
    body = _frame(axes, x_ticks, y_ticks, format_tokens, "tokens per month (input + output)")
    if volume > 0:
        body.append(_vline(axes, volume, f"your volume {format_tokens(volume)}", "volume"))
    body.append(_series(axes, "on-prem", "onprem", ONPREM, onprem))
    body.append(_series(axes, "cloud API", "cloud", CLOUD, cloud))
    if report.break_even_volume is None:
        body.append(_note("on-prem is never cheaper at these inputs"))
    else:
        body.append(
            _marker(
                axes,
                crossing,
                cloud_monthly(i, crossing),
                f"break-even: {format_tokens(crossing)} tokens/mo",
                "break-even",
            )
        )
    body.append(
        _legend(
            f"on-prem, amortized over {i.amortization_months} months",
            f"cloud API at {format_usd(report.cloud_usd_per_mtok)} per 1M tokens",
        )
    )
    return _svg(body, "Monthly cost against monthly volume, on-prem against the cloud API")


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 800px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin: 28px 0 6px; }
.sub { color: #666; margin-top: 0; }
.summary { background: #f5f7fa; border-left: 4px solid #1f5fa8; padding: 10px 16px; }
.summary p { margin: 4px 0; }
svg { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; fill: #333;
      max-width: 100%; height: auto; }
svg .axis-title { fill: #555; } svg .mark { font-weight: 600; fill: #111; }
svg .note { fill: #777; }
svg .mark, svg .note { paint-order: stroke; stroke: white; stroke-width: 4px; }
table { border-collapse: collapse; font-size: 14px; margin-top: 6px; }
td, th { padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; }
tr + tr td { border-top: 1px solid #eee; }
"""


def summary_lines(report: CostReport) -> list[str]:
    """The conclusions in sentences, shared by the terminal and the page."""
    i = report.inputs
    cap = node_capacity_tokens_month(i)
    lines = [
        f"At {i.utilization:.0%} utilization the deployment ({i.nodes} "
        f"node{'s' if i.nodes > 1 else ''}) serves {format_tokens(i.nodes * cap)} tokens a "
        f"month at {format_usd(report.onprem_usd_per_mtok_at_utilization)} per 1M tokens, "
        f"staff included; the API costs {format_usd(report.cloud_usd_per_mtok)} per 1M at "
        f"{i.mean_input_tokens}:{i.mean_output_tokens} input:output tokens."
    ]
    if report.break_even_volume is None:
        lines.append(
            "On-prem is never cheaper at these inputs: even with staff shared across many "
            f"nodes, a node at {i.utilization:.0%} utilization costs "
            f"{format_usd(report.node_usd_per_mtok)} per 1M tokens against "
            f"{format_usd(report.cloud_usd_per_mtok)} from the API."
        )
    else:
        nodes = report.break_even_nodes or i.nodes
        lines.append(
            f"On-prem is cheaper from {format_tokens(report.break_even_volume)} tokens a month "
            f"({nodes} node{'s' if nodes > 1 else ''})."
        )
    volume = i.volume_tokens_month
    capex = report.nodes * i.node_capex_usd
    months = report.break_even_months
    if volume == 0:
        lines.append("At zero volume the API costs nothing, so the hardware never pays back.")
    elif months is None:
        lines.append(
            f"At {format_tokens(volume)} tokens a month the API "
            f"({format_usd(report.cloud_usd_month)}/mo) costs no more than running the "
            f"hardware ({format_usd(report.onprem.running)}/mo before the hardware itself), "
            "so the hardware never pays back."
        )
    else:
        life = "within" if report.pays_back_within_life else "after the end of"
        lines.append(
            f"At {format_tokens(volume)} tokens a month the hardware ({format_usd(capex)}) pays "
            f"for itself in {months:.1f} months, {life} its {i.amortization_months}-month life."
        )
    return lines


def _inputs_table(i: CostInputs) -> str:
    rows = []
    for name, field in CostInputs.model_fields.items():
        value = getattr(i, name)
        shown = format_tokens(value) if name == "volume_tokens_month" else f"{value:,.6g}"
        rows.append(
            f"<tr><td><code>{escape(name)}</code></td><td class='num'>{escape(shown)}</td>"
            f"<td>{escape(field.description or '')}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _breakdown_table(report: CostReport) -> str:
    parts = report.onprem.to_dict()
    labels = {"colo": "rack/colo", "cooling": "cooling (apart from PUE)"}
    rows = [
        f"<tr><td>{escape(labels.get(k, k))}</td><td class='num'>{escape(format_usd(v))}</td>"
        f"<td class='num'></td></tr>"
        for k, v in parts.items()
        if k != "total"
    ]
    rows.append(
        f"<tr><th>total</th><th class='num'>{escape(format_usd(report.onprem.total))}</th>"
        f"<th class='num'>{escape(format_usd(report.cloud_usd_month))}</th></tr>"
    )
    head = "<tr><th></th><th class='num'>on-prem</th><th class='num'>cloud API</th></tr>"
    return "<table>" + head + "".join(rows) + "</table>"


def render_html(report: CostReport) -> str:
    i = report.inputs
    summary = "".join(f"<p>{escape(line)}</p>" for line in summary_lines(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>appliance cost: on-prem against the cloud API</title>
<style>{_CSS}</style></head>
<body>
<h1>On-prem against the cloud API</h1>
<p class="sub">{escape(format_tokens(i.volume_tokens_month))} tokens a month,
{report.nodes} node{"s" if report.nodes > 1 else ""}; written by <code>appliance cost</code>
on {date.today().isoformat()}. Where the defaults come from: docs/cost.md.</p>
<div class="summary">{summary}</div>
<h2>Cumulative cost</h2>
{cumulative_chart(report)}
<h2>Monthly cost against volume</h2>
{volume_chart(report)}
<h2>Monthly cost at {escape(format_tokens(i.volume_tokens_month))} tokens</h2>
{_breakdown_table(report)}
<h2>Inputs</h2>
{_inputs_table(i)}
</body></html>
"""


def write_html(report: CostReport, path: Path) -> Path:
    try:
        path.write_text(render_html(report), encoding="utf-8")
    except OSError as exc:
        raise CostError(
            f"cannot write the chart to {path}: {exc.strerror}",
            hint="Pass --chart with a path in an existing, writable directory, or --no-chart.",
        ) from None
    return path
