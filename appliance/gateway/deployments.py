"""What the gateway knows of each deployed model, beyond where its replicas are.

The deployment record in the state file holds the plan the replicas were started with
and the catalog entry it was made from: the plan's engine (which request extensions it
accepts), `max_model_len` (the context a prompt plus its completion must fit) and
`max_num_seqs` (what one replica runs at once); the entry's modalities and tool-call
parser (which content parts a request may carry). The store holds the model's tokenizer.
Both are re-read every few seconds off the event loop; a tokenizer is loaded once per
installed copy of the model (keyed by its manifest's mtime, so a reinstall is picked up).

A model whose record or tokenizer cannot be read is still served: its prompts go
uncounted (the engine's own check remains) and the reason is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.catalog import ModelEntry
from appliance.control.records import Deployment
from appliance.gateway.tokens import PromptCounter
from appliance.gateway.validate import NO_TOOL_CALLS, extensions_for
from appliance.store import MANIFEST

log = logging.getLogger("appliance.gateway")


# Content parts a model reads beyond text, by catalog modality: request extensions.
MODALITY_PARTS = {"image": "content.image_url", "audio": "content.input_audio"}


@dataclass(frozen=True)
class ModelInfo:
    engine: str
    max_model_len: int | None
    max_num_seqs: int | None
    counter: PromptCounter | None
    # What requests to this model may carry beyond OpenAI's text fields.
    extensions: frozenset[str] = frozenset()


class DeploymentBook:
    """Model name -> ModelInfo, from the state file and the store."""

    def __init__(
        self,
        load: Callable[[], list[Deployment]] | None,
        store_root: Path | None,
        reload_s: float = 2.0,
        entries: Callable[[str], ModelEntry | None] | None = None,
    ) -> None:
        self._load = load
        self._entries = entries
        self._store_root = store_root
        self._reload_s = reload_s
        self._models: dict[str, ModelInfo] = {}
        self._counters: dict[str, tuple[int, PromptCounter | None]] = {}
        self._loaded_at = float("-inf")
        # When each model without a record was last looked for at once (recheck).
        self._rechecked: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()

    def get(self, model: str) -> ModelInfo | None:
        return self._models.get(model)

    async def recheck(self, model: str) -> ModelInfo | None:
        """The info of a model that has replicas, reading the records again at once when it
        has none (just added), but at most once per reload period for each model: one served
        with no record at all (static replicas) must not cost a state read per request."""
        info = self._models.get(model)
        if info is None and self._load is not None:
            now = time.monotonic()
            if now - self._rechecked.get(model, float("-inf")) >= self._reload_s:
                self._rechecked[model] = now
                await self.refresh(force=True)
                info = self._models.get(model)
        return info

    async def refresh(self, force: bool = False) -> None:
        """Re-read when due (or at once when `force`); never raises."""
        if self._load is None:
            return
        if not force and time.monotonic() - self._loaded_at < self._reload_s:
            return
        async with self._lock:
            if not force and time.monotonic() - self._loaded_at < self._reload_s:
                return
            try:
                self._models = await asyncio.to_thread(self._read)
            except Exception as exc:
                # Keep the last good view: a locked or full disk must not stop admission.
                self._warn_once("state", f"deployment records not readable: {exc!r}")
            self._loaded_at = time.monotonic()

    def _read(self) -> dict[str, ModelInfo]:
        assert self._load is not None
        models = {}
        for dep in self._load():
            plan = dep.plan
            # The entry the replicas run with (the record's); the catalog's for records
            # written before records kept it.
            entry = dep.entry or (self._entries(dep.model) if self._entries else None)
            reads = entry.modalities if entry is not None else ()
            parts = {MODALITY_PARTS[m] for m in reads if m in MODALITY_PARTS}
            # Tool calls need the catalog's tool-call parser (a model the catalog does not
            # know is left to its engine to judge).
            if entry is not None and not entry.tool_parser:
                parts.add(NO_TOOL_CALLS)
            models[dep.model] = ModelInfo(
                engine=plan.engine,
                max_model_len=plan.max_model_len,
                max_num_seqs=plan.max_num_seqs,
                counter=self._counter(dep.model),
                extensions=extensions_for(plan.engine) | parts,
            )
        return models

    def _counter(self, model: str) -> PromptCounter | None:
        if self._store_root is None:
            return None
        model_dir = self._store_root / model
        try:
            stamp = (model_dir / MANIFEST).stat().st_mtime_ns
        except OSError:
            self._warn_once(
                model,
                f"{model}: not in the store {self._store_root}; prompts of "
                "this model are not counted",
            )
            return None
        cached = self._counters.get(model)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            counter = PromptCounter.from_model_dir(model_dir)
        except Exception as exc:
            self._warn_once(
                model,
                f"{model}: tokenizer not readable ({exc!r}); prompts of this model are not counted",
            )
            counter = None
        if counter is None:
            self._warn_once(
                model,
                f"{model}: no tokenizer.json in {model_dir}; prompts of this model are not counted",
            )
        self._counters[model] = (stamp, counter)
        return counter

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
