"""Shared pieces of the CLI: consoles, tables that fit the terminal, the current config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from appliance.config import ApplianceConfig, load_config

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

GAP = 2  # spaces between two columns


def config_of(ctx: typer.Context) -> ApplianceConfig:
    root = ctx.find_root()
    path = (root.obj or {}).get("config_path")
    return load_config(path)


Cell = str | Text


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    keys: int = 1,
    out: Console | None = None,
) -> None:
    """Print rows so that they fit the console without splitting a word or a number.

    Columns keep their natural width when the table fits. Otherwise cells wrap between
    words, never inside one. When even that is too wide, the columns are split over
    several tables, each repeating the first `keys` columns (the ones that name a row).
    Plain strings are printed as they are (names are data, not markup); pass Text for style.
    """
    out = out or console
    header_cells = [Text(h) for h in headers]
    body = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    columns = [[header_cells[i], *(row[i] for row in body)] for i in range(len(headers))]
    natural = [max(c.cell_len for c in col) for col in columns]
    minimum = [max(_longest_word(c) for c in col) for col in columns]
    keys = min(keys, len(headers))
    for n, chunk in enumerate(_chunks(natural, minimum, keys, out.width)):
        widths = _fit([natural[i] for i in chunk], [minimum[i] for i in chunk], out.width)
        table = Table(box=None, pad_edge=False, padding=(0, GAP // 2), header_style="bold")
        for i, width in zip(chunk, widths, strict=True):
            table.add_column(header_cells[i], width=width, overflow="fold")
        for row in body:
            table.add_row(*(row[i] for i in chunk))
        if n:
            out.print()
        # At the layout's own width: narrower than the console whenever a layout fits, and
        # never squeezed by rich (which would cut words) when even the narrowest does not.
        out.print(table, width=max(out.width, _total(widths)))


def _longest_word(text: Text) -> int:
    return max((len(word) for word in text.plain.split()), default=0)


def _total(widths: Sequence[int]) -> int:
    return sum(widths) + GAP * max(len(widths) - 1, 0)


def _fit(natural: list[int], minimum: list[int], width: int) -> list[int]:
    """Column widths within `width`: natural when they fit, else shared out fairly from
    each column's longest word up (the narrowest columns are satisfied first)."""
    if _total(natural) <= width:
        return natural
    if _total(minimum) >= width:
        return minimum
    widths = list(minimum)
    spare = width - _total(widths)
    wanting = [i for i in range(len(widths)) if natural[i] > widths[i]]
    while spare > 0 and wanting:
        share = spare // len(wanting)
        satisfied = [i for i in wanting if natural[i] - widths[i] <= share]
        if not satisfied:
            for n, i in enumerate(wanting):
                widths[i] += share + (1 if n < spare % len(wanting) else 0)
            break
        for i in satisfied:
            spare -= natural[i] - widths[i]
            widths[i] = natural[i]
            wanting.remove(i)
    return widths


def _chunks(natural: list[int], minimum: list[int], keys: int, width: int) -> list[list[int]]:
    """Which columns go in which table: all in one when they fit, else the fewest tables,
    packed by natural width when that needs no more tables than packing by words does."""
    every = list(range(len(natural)))
    if _total(minimum) <= width:
        return [every]

    def pack(sizes: list[int]) -> list[list[int]]:
        head = every[:keys]
        chunks: list[list[int]] = []
        current = list(head)
        for i in every[keys:]:
            if len(current) > len(head) and _total([sizes[j] for j in [*current, i]]) > width:
                chunks.append(current)
                current = list(head)
            current.append(i)
        chunks.append(current)
        return chunks

    by_natural, by_words = pack(natural), pack(minimum)
    return by_natural if len(by_natural) <= len(by_words) else by_words


def print_json(data: Any) -> None:
    # Plain print: scripts parse this, so no rich markup or wrapping.
    print(json.dumps(data, indent=2, sort_keys=True, default=str))
