"""tiny-random-llama: a small Llama checkpoint built here, with no download.

The embedded default and the tests need a real Hugging Face checkpoint that every
engine path can load (config, safetensors weights, a fast tokenizer with a chat
template, a generation config) without network access. The weights are random and
the tokenizer is trained on the corpus below, so the model talks nonsense, but it
talks through exactly the code that serves real models.

The build is deterministic: on the same torch, transformers and tokenizers versions
every file comes out byte-identical, so its manifest hashes are stable and a store
can tell a rebuilt model from a corrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.errors import StoreError

# The store's source string for this build. A new shape is a new version, so a store
# holding an older build (head_dim 16, which vLLM's CPU kernels reject) is rebuilt.
SOURCE = "builtin:tiny-random-llama@2"
SEED = 0
VOCAB_SIZE = 512
MAX_POSITIONS = 2048
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = 64

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
# Hermes-style tool-call tags, as vLLM's `hermes` tool parser looks for them: single
# tokens, so a call is cheap to emit and easy to find.
TOOL_CALL = "<tool_call>"
END_TOOL_CALL = "</tool_call>"
# The trainer gives special tokens the first ids, in this order.
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD, TOOL_CALL, END_TOOL_CALL)

# Llama-3 layout with Hermes-style tools (the catalog's tool_parser is `hermes`): the
# tools go into the system turn as JSON inside <tools></tools>; an assistant's calls are
# <tool_call>{"name": ..., "arguments": ...}</tool_call>; a tool's answer is a `tool`
# turn. Content may be a string or a list of OpenAI-style parts, because OpenAI clients
# send both and servers pass them through to the template as given. Arguments may be a
# JSON string (OpenAI's wire format, as the gateway renders it to count tokens) or a
# mapping (vLLM parses them before rendering).
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content | trim }}"
    "{%- elif content -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token }}"
    "{%- set loop_messages = messages %}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- text(messages[0]['content']) + '\\n\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- endif %}"
    "{{- 'You may call functions. Their signatures are in <tools></tools>:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    '{{- \'</tools>\\nTo call one, answer <tool_call>{"name": NAME, "arguments": '
    "ARGUMENTS}</tool_call>.<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- text(message['content']) }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set function = call['function'] %}"
    "{{- '<tool_call>{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' }}"
    "{%- if function['arguments'] is string %}{{- function['arguments'] }}"
    "{%- else %}{{- function['arguments'] | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Enough varied English for the trainer to find VOCAB_SIZE tokens: byte-level BPE
# stops early when it runs out of pairs to merge.
CORPUS = (
    "The appliance serves language models to the people who work here.",
    "An administrator installs it on a rack of machines, adds a model, and hands out keys.",
    "Users call the endpoint with the clients they already know and get answers back.",
    "When the local machines are busy, some requests may go to a cloud provider instead.",
    "Requests that carry private data never leave the building, whatever the load.",
    "Every request is counted: tokens in, tokens out, time to the first token, and cost.",
    "You are a helpful assistant. Answer briefly, and say so when you do not know.",
    "Hello! How can I help you today? What would you like to know about the weather?",
    "Can you summarize this document in three sentences for the weekly report, please?",
    "Sure. Here is a short summary of the main points, followed by a list of open questions.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm window.",
    "Numbers matter too: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2048, 3.14, 1e-5 and 65535.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    '{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}]}',
    "system user assistant tool function message content role name stream usage",
    '<tools>{"type": "function", "function": {"name": "get_weather", "parameters": {}}}</tools>',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"answer": true, "items": [1, 2, 3], "text": null, "score": 0.5}',
    "GPUs, memory, throughput, latency, queue depth, replicas, health checks, and logs.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday make a week.",
    "January, February, March, April, May, June, July, August, September, October.",
    "Water boils at one hundred degrees; ice melts at zero. Light travels very fast.",
    "Please check the configuration file, restart the service, and try the request again.",
    "If the model is missing, add it with the command line tool and wait until it is ready.",
    "Thank you! That was useful. Could you also explain why the second step is needed?",
)


def build(dest: Path) -> None:
    """Write the complete checkpoint into ``dest`` (created if missing)."""
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(dest / "tokenizer.json"), pretty=True)
    _write_json(dest / "tokenizer_config.json", _tokenizer_config())
    _write_model(dest, token_id=tokenizer.token_to_id)


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    # Like Llama 3: plain encoding starts with BOS; the chat template adds its own.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise StoreError(
            f"The tiny model's tokenizer came out with {tokenizer.get_vocab_size()} tokens, "
            f"not {VOCAB_SIZE}.",
            hint="Add varied text to CORPUS in appliance/tinymodel.py.",
        )
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    # Written by hand rather than by save_pretrained, so the file does not drift with
    # whatever a transformers release chooses to add to it.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_model(dest: Path, *, token_id: Any) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos, eos, eot, pad = (token_id(t) for t in (BOS, EOS, EOT, PAD))
    config = LlamaConfig(
        # head_dim 64: vLLM's CPU attention kernels reject 16 ("Unsupported CPU attention
        # configuration"); two query heads share one KV head, so the KV cache stays small.
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=[eos, eot],
        pad_token_id=pad,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    # fork_rng keeps the caller's global RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    # A chat turn ends with <|eot_id|>, plain text with <|end_of_text|>: stop on both.
    # No sampling defaults: vLLM reads this file for them, and a request's own
    # temperature/top_p/seed must decide (temperature 0 gives the same reply every time).
    GenerationConfig(bos_token_id=bos, eos_token_id=[eos, eot], pad_token_id=pad).save_pretrained(
        dest
    )
    config.save_pretrained(dest)
    # save_file rather than model.save_pretrained: the same bytes, without a progress bar.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    weights = dest / "model.safetensors"
    save_file(state, weights, metadata={"format": "pt"})
    # safetensors creates the file 0600; engines may run as another user.
    weights.chmod(0o644)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
