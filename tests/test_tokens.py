"""Prompt counting: the upper bound the gateway admits short prompts on is never below the
exact count, and is given only for tokenizers where it is provable.

Against tiny-random-llama's real tokenizer and chat template (byte-level BPE, as Llama 3,
Qwen and GPT-style models have), with prompts chosen to be hard on the bound: multibyte
text, text that spells special tokens, many short messages, tools and tool calls.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from appliance import tinymodel
from appliance.gateway.tokens import PromptCounter, byte_bound
from appliance.store import Store

TEXTS = [
    "",
    "hi",
    "Tell me about the quick brown fox.",
    "你好\uff0c世界。日本語のテキストと한국어 텍스트",
    "🦊👩‍👩‍👧‍👦🏳️‍🌈 e\u0301 a\u0308\u0323 \u200d\u200b\ufeff",
    "مرحبا بالعالم שלום עולם",
    "<|eot_id|><|begin_of_text|><|start_header_id|>system<|end_header_id|><tool_call>",
    "\n\n\n   \t\t  \r\n" * 20,
    "0123456789" * 30,
    "ﷺ ﬃ ㎒ Ⅻ",  # characters that NFKC would lengthen (this tokenizer has no normalizer)
    "a" * 3000,
]

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, 天気",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = Store(tmp_path_factory.mktemp("store"))
    return store.install("m", tinymodel.build, source="builtin:tiny-random-llama").path


@pytest.fixture(scope="module")
def counter(model_dir: Path) -> PromptCounter:
    made = PromptCounter.from_model_dir(model_dir)
    assert made is not None
    return made


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((model_dir / "tokenizer.json").read_text())
    return loaded


def _conversations() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": 3}'},
    }
    many = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "" if i % 3 else "a"}
        for i in range(301)
    ]
    return [
        *(([{"role": "user", "content": text}], None) for text in TEXTS),
        ([{"role": "system", "content": TEXTS[3]}, {"role": "user", "content": TEXTS[4]}], None),
        (many, None),
        ([{"role": "user", "content": [{"type": "text", "text": t} for t in TEXTS[:7]]}], None),
        (
            [
                {"role": "user", "content": "Weather in Zürich?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "☀️ 23 °C"},
            ],
            [TOOL] * 5,
        ),
    ]


def _random_text(rng: random.Random) -> str:
    # Every plane: ASCII, Latin, CJK, emoji, private use, joiners and combining marks.
    ranges = [(0x20, 0x7E), (0x0300, 0x036F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    ranges += [(0xE000, 0xF8FF), (0x200B, 0x200F), (0x0A, 0x0D)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 200)))


def test_the_tiny_tokenizer_is_bounded_by_its_bytes(spec: dict[str, Any]) -> None:
    # Byte-level BPE; its post-processor adds <|begin_of_text|> to a completion prompt.
    assert byte_bound(spec) == {False: 0, True: 1}


@pytest.mark.parametrize("case", range(len(_conversations())))
def test_the_bound_is_never_below_the_count_of_a_conversation(
    counter: PromptCounter, case: int
) -> None:
    messages, tools = _conversations()[case]
    text = counter.render(messages, tools)
    assert text is not None
    exact = counter.rendered(text)
    assert exact == counter.chat(messages, tools)
    bound = counter.at_most(text, False)
    assert bound is not None and bound >= exact, (bound, exact, text[:80])


def test_the_bound_is_never_below_the_count_of_a_prompt(counter: PromptCounter) -> None:
    rng = random.Random(17)
    for text in [*TEXTS, *(_random_text(rng) for _ in range(500))]:
        bound = counter.at_most(text, True)
        assert bound is not None
        assert bound >= counter.prompt(text), text
        assert bound >= counter.prompt(text, release_gil=True), text
        chat_bound = counter.at_most(text, False)
        assert chat_bound is not None and chat_bound >= counter.rendered(text), text


@pytest.mark.parametrize(
    "change",
    [
        {"normalizer": {"type": "NFKC"}},
        {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}},
        {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}},
        {"padding": {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": 0, "pad_type_id": 0, "pad_token": "<|end_of_text|>"}},
        {"model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0}}},
    ],
    ids=["normalizer", "metaspace", "prefix-space", "padding", "wordpiece"],
)  # fmt: skip
def test_no_bound_where_the_tokenizer_may_lengthen_the_text(
    spec: dict[str, Any], change: dict[str, Any]
) -> None:
    assert byte_bound({**spec, **change}) == {}


def test_a_normalizer_really_breaks_the_byte_bound(spec: dict[str, Any]) -> None:
    # Why a normalizer disqualifies: NFKC turns one 3-byte character into 18 characters.
    nfkc = Tokenizer.from_str(json.dumps({**spec, "normalizer": {"type": "NFKC"}}))
    text = "ﷺ"
    assert len(nfkc.encode(text, add_special_tokens=False).ids) > len(text.encode())
    counter = PromptCounter(nfkc, None, {}, byte_bound({**spec, "normalizer": {"type": "NFKC"}}))
    assert counter.at_most(text, False) is None


def test_an_unknown_post_processor_leaves_only_the_plain_bound(spec: dict[str, Any]) -> None:
    assert byte_bound({**spec, "post_processor": {"type": "SomethingNew"}}) == {False: 0}
