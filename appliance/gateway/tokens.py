"""Prompt tokens counted the way the engine will count them: the model's own tokenizer.

A model in the store carries `tokenizer.json` (the `tokenizers` library reads it) and its
chat template (in `tokenizer_config.json` or `chat_template.jinja`). Chat messages are
rendered with that template in a sandbox set up like transformers' own (the engines use
transformers' renderer: same filters, globals and extensions), then encoded without
adding special tokens, as `apply_chat_template` does; a completion prompt is encoded with
them. A short text is encoded with `encode`, which holds the GIL but costs tens of
microseconds; a long one (`release_gil=True`, in a worker thread) with `encode_batch`,
which releases the GIL, so counting it does not hold up the event loop (measured: a
2 MB prompt let the loop run 3 times in 2.7 s with `encode`, 60,000 times with
`encode_batch`). `encode_batch` is not used for everything: it wakes the tokenizer's
thread pool, which added about half a millisecond to each small request.

A template that refuses the conversation (`raise_exception`, e.g. roles that do not
alternate) is the client's error, reported as the engine would report it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

log = logging.getLogger("appliance.gateway")

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class TemplateRefused(Exception):
    """The model's chat template rejects these messages; the message says why."""


def _raise_exception(message: str) -> None:
    raise TemplateRefused(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML; chat templates expect plain JSON (as transformers).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tags): the
    body renders as it is; only training code tracks where it falls."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class PromptCounter:
    """Counts prompt tokens for one model."""

    def __init__(
        self, tokenizer: Any, template: str | None, special_tokens: dict[str, str]
    ) -> None:
        self._tokenizer = tokenizer
        # In characters of the vocabulary's own spelling (one per byte for byte-level BPE),
        # which is never shorter than the text a token stands for.
        self._longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        self._template = _environment().from_string(template) if template else None
        self._special = special_tokens

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> PromptCounter | None:
        """The counter for a checkpoint directory; None when it has no fast tokenizer."""
        from tokenizers import Tokenizer

        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            return None
        config: dict[str, Any] = {}
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            loaded = json.loads(config_file.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        special = {
            key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))
        }
        return cls(
            Tokenizer.from_file(str(tokenizer_file)), _chat_template(model_dir, config), special
        )

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def _encode(self, text: str, add_special_tokens: bool, release_gil: bool) -> int:
        if release_gil:
            batch = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
            return len(batch[0].ids)
        return len(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def at_least(self, chars: int) -> int:
        """A lower bound on the tokens of a text this long, without encoding it: no
        token is longer than the longest in the vocabulary."""
        return chars // self._longest_token

    def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        release_gil: bool = False,
    ) -> int:
        """Tokens of the rendered conversation, generation prompt included."""
        if self._template is None:
            # No template: the engine refuses chat for this model; nothing to count.
            return 0
        context: dict[str, Any] = {
            **self._special,
            "add_generation_prompt": True,
            **(template_kwargs or {}),
            "messages": messages,
            "tools": tools,
        }
        try:
            text = self._template.render(**context)
        except TemplateRefused:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateRefused(f"the model's chat template failed: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateRefused(
                f"the model's chat template cannot render these messages: {exc}"
            ) from None
        return self._encode(text, add_special_tokens=False, release_gil=release_gil)

    def prompt(self, prompt: str | list[int], release_gil: bool = False) -> int:
        """Tokens of one completion prompt (token ids count as they are)."""
        if isinstance(prompt, list):
            return len(prompt)
        return self._encode(prompt, add_special_tokens=True, release_gil=release_gil)
