from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from appliance import tinymodel
from appliance.store import InstalledModel, Store

# huggingface_hub reads this when first imported; local_files_only below covers the rest.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("torch")
pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[InstalledModel, InstalledModel]:
    first, second = (
        Store(tmp_path_factory.mktemp(f"store{i}")).install(
            "tiny-random-llama", tinymodel.build, source="local:tiny-random-llama"
        )
        for i in range(2)
    )
    return first, second


@pytest.fixture(scope="module")
def model_dir(installed: tuple[InstalledModel, InstalledModel]) -> Path:
    return installed[0].path


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def test_build_is_deterministic(installed: tuple[InstalledModel, InstalledModel]) -> None:
    first, second = installed
    assert first.manifest == second.manifest
    assert [f.path for f in first.manifest.files] == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_config_matches_the_spec(model_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 256, 2)
    # vLLM's CPU attention kernels take head_dim 32 and up (16 is rejected).
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (512, 2048)
    assert config.tie_word_embeddings is False


def test_tokenizer_round_trips_text(tokenizer: Any) -> None:
    text = "Hello, world! The appliance serves 42 models. ünïcødé 🚀\n\tdone"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < 512
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == 512


def test_special_tokens(tokenizer: Any) -> None:
    for token in tinymodel.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) < len(tinymodel.SPECIAL_TOKENS)
        assert tokenizer(token, add_special_tokens=False).input_ids == [
            tokenizer.convert_tokens_to_ids(token)
        ]
    assert tokenizer.eos_token == "<|eot_id|>"


def test_chat_template_renders(tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without_prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert without_prompt.endswith("Hello there<|eot_id|>")


def test_chat_template_accepts_content_parts(tokenizer: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == tokenizer.apply_chat_template(
        MESSAGES[1:], tokenize=False
    )


def test_chat_template_renders_tools_and_tool_calls(tokenizer: Any) -> None:
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    rendered = tokenizer.apply_chat_template(
        messages, tools=[tool], tokenize=False, add_generation_prompt=True
    )
    # The system turn carries the user's system text, then the tools (Hermes style).
    assert rendered.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\n"
        "You may call functions."
    )
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert rendered.count("<|start_header_id|>system") == 1
    # Arguments as OpenAI sends them (a JSON string) and as vLLM hands them over (parsed)
    # render the same.
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n<tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}</tool_call><|eot_id|>'
    ) in rendered
    parsed = [{**call, "function": {**call["function"], "arguments": {"city": "Paris"}}}]
    messages[2] = {"role": "assistant", "content": None, "tool_calls": parsed}
    again = tokenizer.apply_chat_template(
        messages, tools=[tool], tokenize=False, add_generation_prompt=True
    )
    assert again == rendered
    assert "<|start_header_id|>tool<|end_header_id|>\n\nsunny<|eot_id|>" in rendered
    # The tool-call tags are single tokens, as vLLM's hermes parser expects.
    for tag in (tinymodel.TOOL_CALL, tinymodel.END_TOOL_CALL):
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1


def test_generate_returns_tokens(model_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
    ]
    inputs = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new_tokens = output[0, prompt_len:].tolist()
    assert len(new_tokens) == 8
    assert all(0 <= t < 512 for t in new_tokens)
