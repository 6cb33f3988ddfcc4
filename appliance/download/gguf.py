"""GGUF -> a Hugging Face checkpoint engines load: safetensors, config, tokenizer, chat template.

transformers does the conversion, as it does when it loads a GGUF itself: it reads the
file's metadata into a config, its vocabulary and merges into a fast tokenizer
(``tokenizer.json``, the file the gateway counts prompt tokens with) with the chat template
the GGUF carries (``chat_template.jinja``), and dequantizes every tensor into the dtype
asked for. ``save_pretrained`` then writes the layout engines read: Hub tensor names, tied
embeddings stored once, ``generation_config.json`` with the file's end-of-turn token.

What the store changes after that, and why:

- ``config.json`` loses a ``quantization_config`` naming gguf when one is written: the
  weights are no longer quantized, and vLLM would try to load the directory as a GGUF.
- every file is made readable by all: safetensors creates its file 0600, and engines may
  run as another user.

It runs in the calling process: the largest checkpoint a GGUF package carries today (a
135M-parameter model) peaks at about 1 GB of memory, and the store's ENOSPC handling sees
real OSErrors. With the same transformers, tokenizers, torch and gguf versions, the same
GGUF gives byte-identical files. ``config.json`` and ``generation_config.json`` record the
transformers version that wrote them; that is kept: it is fixed by the appliance's pins
and says which converter wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.download.local import human_size
from appliance.errors import StoreError

# What `from_pretrained(..., gguf_file=...)` needs: transformers refuses GGUF without
# accelerate, and reads the file with gguf.
REQUIRED = ("torch", "transformers", "gguf", "accelerate")


def require_converter(what: str) -> None:
    """Fail before any download when this environment cannot convert a GGUF."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise StoreError(
            f"Installing {what} converts a GGUF file with transformers, and this environment "
            f"lacks {', '.join(missing)}.",
            hint="Install the appliance's cpu extra (`pip install 'appliance[cpu]'`: torch, "
            "transformers, gguf and accelerate), then run the command again.",
        )


def convert(
    gguf: Path,
    dest: Path,
    *,
    dtype: str,
    progress: bool,
    on_step: Callable[[str], None] = lambda _: None,
) -> None:
    """Write the checkpoint of ``gguf`` into ``dest``, its tensors in ``dtype`` (a torch
    dtype name: bfloat16, float32). A full disk raises OSError(ENOSPC)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = {"gguf_file": gguf.name, "local_files_only": True}
    with _library_output(progress):
        on_step(f"reading the tokenizer and chat template of {gguf.name}")
        tokenizer = _load(gguf, lambda: AutoTokenizer.from_pretrained(gguf.parent, **where))
        on_step(f"dequantizing the weights of {gguf.name} to {dtype}")
        model = _load(
            gguf,
            lambda: AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                dtype=getattr(torch, dtype),
                # Unpacked at load: a packed model is one save_pretrained refuses to write.
                quantization_config=GgufConfig(dequantize=True),
                **where,
            ),
        )
        weights = _weight_bytes(model)
        on_step(
            f"writing {human_size(weights)} of {dtype} safetensors with transformers "
            f"{transformers.__version__}"
        )
        dest.mkdir(parents=True, exist_ok=True)
        if weights > shutil.disk_usage(dest).free:
            raise _no_space(dest)
        tokenizer.save_pretrained(dest)
        try:
            model.save_pretrained(dest)
        except OSError:
            raise
        except Exception as exc:
            # safetensors reports a full disk as its own error type, and deletes what it
            # wrote: a write that failed with less room left than the weights take ran out.
            if shutil.disk_usage(dest).free < weights:
                raise _no_space(dest) from exc
            raise
    _drop_gguf_quantization(dest / "config.json")
    for path in dest.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def _load(gguf: Path, load: Callable[[], Any]) -> Any:
    """Run a transformers loader, its refusals (an architecture or tokenizer it cannot
    convert, a damaged file) turned into a StoreError; OSErrors pass, for ENOSPC."""
    try:
        return load()
    except OSError:
        raise
    except Exception as exc:
        import transformers

        raise StoreError(
            f"transformers {transformers.__version__} cannot convert {gguf.name}: {exc}",
            hint="The file must be a GGUF of an architecture transformers converts (its "
            "GGUF documentation lists them) with an embedded tokenizer; check `file` in the "
            "model's catalog source, or install a converted checkpoint with "
            "`appliance model add NAME --from PATH`.",
        ) from exc


def _weight_bytes(model: Any) -> int:
    """Bytes the safetensors file takes: each tensor once, tied ones share storage."""
    storages: dict[int, int] = {}
    for tensor in model.state_dict().values():
        storages[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(storages.values())


def _no_space(dest: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))


def _drop_gguf_quantization(config_file: Path) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        del config["quantization_config"]
        # transformers' own layout (to_json_string), so the file reads as it wrote it.
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _library_output(progress: bool) -> Iterator[None]:
    """The progress bars transformers draws through its logging (writing the shards) only
    when progress is shown, and none of its advice (fastest dtypes, kernels to install): it
    concerns running the model, not converting it. Its GGUF reader's per-tensor bar uses
    tqdm directly and shows either way, on stderr."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if progress:
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        else:
            logging.disable_progress_bar()
