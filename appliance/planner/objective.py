"""Objectives: what "the plan that serves best" means, and the batch a candidate runs under it.

    throughput  the most output tokens/s from the free GPUs, every request decoding at
                least `user` tokens/s and getting its first token within `ttft` seconds
                (the default: a shared endpoint that stays pleasant to use under load)
    min-gpus    the fewest GPUs that serve `load` output tokens/s under the same bounds

Precision is one more dimension of the candidates, ranked like the others, among the
catalog's precisions no lossier than `lowest` (default: fp8, or the model's own default
precision where that is lossier, as gpt-oss's MXFP4). FP8 with per-tensor or block scales is
what NVIDIA and Meta publish as serving checkpoints; 4-bit formats cost accuracy a plan
should not trade for speed unless the operator says so.

Text form, for --objective: `throughput`, `throughput,user=30,ttft=1`, `min-gpus,load=20000`,
`throughput,lowest=nvfp4`; `user=0` or `ttft=0` drops that bound. A candidate runs the
largest batch that keeps both bounds; the engine's max_num_seqs is set to it, so the bounds
hold when traffic exceeds it (the gateway queues the rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from appliance.gpus import PRECISION_ORDER
from appliance.planner.roofline import Throughput

# Defaults for a shared chat endpoint: 20 tokens/s is several times reading speed and the
# pace chat UIs stream at; 2 s before the first token is where people start to wait.
DEFAULT_MIN_USER_TOK_S = 20.0
DEFAULT_MAX_TTFT_S = 2.0
DEFAULT_LOWEST = "fp8"
KINDS = ("throughput", "min-gpus")


@dataclass(frozen=True)
class Objective:
    kind: Literal["throughput", "min-gpus"] = "throughput"
    min_user_tok_s: float = DEFAULT_MIN_USER_TOK_S  # 0: no floor
    max_ttft_s: float = DEFAULT_MAX_TTFT_S  # 0: no bound
    load_tok_s: float = 0.0  # min-gpus: output tokens/s the replicas must serve together
    lowest: str | None = None  # the lossiest precision allowed; None: DEFAULT_LOWEST

    def __post_init__(self) -> None:
        if self.lowest is not None and self.lowest not in PRECISION_ORDER:
            raise ValueError(f"lowest={self.lowest} is not one of {', '.join(PRECISION_ORDER)}")
        if self.kind not in KINDS:
            raise ValueError(f"objective '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.min_user_tok_s < 0 or self.max_ttft_s < 0:
            raise ValueError("user and ttft bounds are positive numbers (0: no bound)")
        if self.kind == "min-gpus" and self.load_tok_s <= 0:
            raise ValueError("min-gpus needs the load to serve: min-gpus,load=OUTPUT_TOK_S")
        if self.kind == "throughput" and self.load_tok_s:
            raise ValueError("load= goes with min-gpus, not throughput")

    @classmethod
    def parse(cls, text: str) -> Objective:
        """'KIND[,user=TOK_S][,ttft=SECONDS][,load=TOK_S][,lowest=PRECISION]', e.g.
        'min-gpus,load=20000'."""
        kind, *pairs = [part.strip() for part in text.split(",")]
        keys = {"user": "min_user_tok_s", "ttft": "max_ttft_s", "load": "load_tok_s"}
        values: dict[str, float] = {}
        lowest: str | None = None
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if sep and key == "lowest":
                lowest = value
                continue
            if not sep or key not in keys:
                raise ValueError(
                    f"'{pair}' in objective '{text}' is not one of user=, ttft=, load=, lowest="
                )
            try:
                values[keys[key]] = float(value)
            except ValueError:
                raise ValueError(f"'{pair}' in objective '{text}': not a number") from None
        if kind not in KINDS:
            raise ValueError(
                f"objective '{kind}' is not one of {', '.join(KINDS)} "
                "(e.g. throughput,user=20,ttft=2 or min-gpus,load=20000)"
            )
        return cls(kind, lowest=lowest, **values)  # type: ignore[arg-type]

    def bounds(self) -> str:
        parts = []
        if self.min_user_tok_s:
            parts.append(f"every request at >= {self.min_user_tok_s:g} output tok/s")
        if self.max_ttft_s:
            parts.append(f"first token within {self.max_ttft_s:g} s")
        return " and ".join(parts) or "no latency bounds"

    def describe(self) -> str:
        if self.kind == "min-gpus":
            return f"fewest GPUs for {self.load_tok_s:,.0f} output tok/s, {self.bounds()}"
        return f"most output tok/s from the free GPUs, {self.bounds()}"

    def floor(self, default_precision: str) -> str:
        """The lossiest precision a plan may use for a model whose catalog default is
        `default_precision`: `lowest`, else fp8 or the model's default if that is lossier."""
        if self.lowest is not None:
            return self.lowest
        rank = PRECISION_ORDER.index
        native = default_precision if default_precision in PRECISION_ORDER else "bf16"
        return max(DEFAULT_LOWEST, native, key=rank)

    def allows(self, precision: str, default_precision: str) -> bool:
        rank = PRECISION_ORDER.index
        return rank(precision) <= rank(self.floor(default_precision))

    def meets(self, t: Throughput) -> bool:
        user = not self.min_user_tok_s or t.per_user_tok_s >= self.min_user_tok_s
        return user and (not self.max_ttft_s or t.ttft_s <= self.max_ttft_s)

    def best_batch(self, run: Callable[[int], Throughput], most: int) -> Throughput | None:
        """The largest batch up to `most` that meets the bounds (per-user speed falls and
        TTFT grows with the batch, so a bisection finds it); None when one sequence misses."""
        if not self.meets(run(1)):
            return None
        low, high = 1, max(1, most)
        if self.meets(run(high)):
            return run(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.meets(run(mid)) else (low, mid)
        return run(low)

    def replicas_for(self, replica_tok_s: float) -> int:
        """min-gpus: replicas that serve the load together."""
        return max(1, math.ceil(self.load_tok_s / replica_tok_s))
