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

Where encoding can be skipped: for a byte-level BPE tokenizer with nothing that lengthens
the text before it is split (no normalizer, pre-tokenizers that only split, no padding),
every token stands for at least one byte of the text and every added token for at least
one character, so a text never has more tokens than UTF-8 bytes (`at_most`), plus what
the post-processor adds around it. The gateway uses that bound to admit a short prompt
that plainly fits without encoding it, and counts exactly whenever the number itself is
needed.
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


# Pre-tokenizers that only cut the text into pieces (or drop some of it): never more bytes.
_SPLITTING = {"Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"}


def _splits_byte_level(pre: Any) -> bool:
    """A ByteLevel pre-tokenizer that adds no prefix space, alone or among splitters."""
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return pre.get("add_prefix_space") is False
    if pre.get("type") != "Sequence":
        return False
    parts = pre.get("pretokenizers")
    if not isinstance(parts, list):
        return False
    levels = [p for p in parts if isinstance(p, dict) and p.get("type") == "ByteLevel"]
    others = [p for p in parts if p not in levels]
    return (
        len(levels) == 1
        and _splits_byte_level(levels[0])
        and all(isinstance(p, dict) and p.get("type") in _SPLITTING for p in others)
    )


def _added_by_post_processor(post: Any) -> int | None:
    """Tokens the post-processor adds to one sequence; None when that is not plain."""
    if post is None:
        return 0
    if not isinstance(post, dict):
        return None
    kind = post.get("type")
    if kind == "ByteLevel":
        return 0
    if kind in ("BertProcessing", "RobertaProcessing"):
        return 2
    if kind == "Sequence":
        counts = [_added_by_post_processor(p) for p in post.get("processors") or [None]]
        return None if None in counts else sum(c for c in counts if c is not None)
    if kind == "TemplateProcessing":
        tokens = post.get("special_tokens") or {}
        added = 0
        for piece in post.get("single") or []:
            special = piece.get("SpecialToken") if isinstance(piece, dict) else None
            if special is None:
                continue
            ids = (tokens.get(special.get("id")) or {}).get("ids")
            if not isinstance(ids, list):
                return None
            added += len(ids)
        return added
    return None


def byte_bound(spec: dict[str, Any]) -> dict[bool, int]:
    """For a tokenizer.json whose token count never exceeds the text's UTF-8 bytes: what
    to add to the bytes without special tokens (False) and with them (True). Empty when
    the tokenizer gives no such bound (a normalizer may lengthen the text, a Metaspace
    pre-tokenizer prepends a marker, padding adds tokens...)."""
    model = spec.get("model")
    added = spec.get("added_tokens") or []
    if (
        spec.get("normalizer") is not None
        or spec.get("padding") is not None
        or not isinstance(model, dict)
        or model.get("type") != "BPE"
        or not _splits_byte_level(spec.get("pre_tokenizer"))
        # An added token matches at least one character of the text.
        or not all(isinstance(t, dict) and t.get("content") for t in added)
    ):
        return {}
    extras = {False: 0}
    special = _added_by_post_processor(spec.get("post_processor"))
    if special is not None:
        extras[True] = special
    return extras


class PromptCounter:
    """Counts prompt tokens for one model."""

    def __init__(
        self,
        tokenizer: Any,
        template: str | None,
        special_tokens: dict[str, str],
        bound: dict[bool, int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        # What `at_most` adds to a text's bytes, by add_special_tokens; empty: no bound.
        self._bound = bound or {}
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
        raw = tokenizer_file.read_text(encoding="utf-8")
        spec = json.loads(raw)
        return cls(
            Tokenizer.from_str(raw),
            _chat_template(model_dir, config),
            special,
            byte_bound(spec) if isinstance(spec, dict) else {},
        )

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def _encode(self, text: str, add_special_tokens: bool, release_gil: bool) -> int:
        if release_gil:
            batch = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
            return len(batch[0].ids)
        return len(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def at_most(self, text: str, add_special_tokens: bool) -> int | None:
        """An upper bound on the tokens of `text`, without encoding it; None when this
        tokenizer gives none (see the module docstring)."""
        extra = self._bound.get(add_special_tokens)
        return None if extra is None else len(text.encode("utf-8", "surrogatepass")) + extra

    def at_least(self, chars: int) -> int:
        """A lower bound on the tokens of a text this long, without encoding it: no
        token is longer than the longest in the vocabulary."""
        return chars // self._longest_token

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str | None:
        """The conversation as the chat template writes it, generation prompt included;
        None without a template (the engine refuses chat for such a model)."""
        if self._template is None:
            return None
        context: dict[str, Any] = {
            **self._special,
            "add_generation_prompt": True,
            **(template_kwargs or {}),
            "messages": messages,
            "tools": tools,
        }
        try:
            rendered: str = self._template.render(**context)
        except TemplateRefused:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateRefused(f"the model's chat template failed: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateRefused(
                f"the model's chat template cannot render these messages: {exc}"
            ) from None
        return rendered

    def rendered(self, text: str, release_gil: bool = False) -> int:
        """Tokens of a rendered conversation (its special tokens are in the text)."""
        return self._encode(text, add_special_tokens=False, release_gil=release_gil)

    def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        release_gil: bool = False,
    ) -> int:
        """Tokens of the rendered conversation, generation prompt included."""
        text = self.render(messages, tools, template_kwargs)
        # No template: the engine refuses chat for this model; nothing to count.
        return 0 if text is None else self.rendered(text, release_gil)

    def prompt(self, prompt: str | list[int], release_gil: bool = False) -> int:
        """Tokens of one completion prompt (token ids count as they are)."""
        if isinstance(prompt, list):
            return len(prompt)
        return self._encode(prompt, add_special_tokens=True, release_gil=release_gil)
