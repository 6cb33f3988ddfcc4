"""Files people write (appliance.toml, models.toml, cost inputs, install files): read, validated
by strict models, and their errors told in the file's own terms.

    Strict              the one base of those models: unknown keys are errors, values are not
                        coerced, models are frozen
    read_toml           a TOML file as a dict; every way it can fail names the file
    problems            a ValidationError as lines "FILE: table.key: what is wrong"

This module imports nothing of the appliance but its errors, so every layer may use it.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Tag, ValidationError
from pydantic import Strict as StrictType

from appliance.errors import ApplianceError

Port = Annotated[int, Field(ge=1, le=65535)]
# Models are strict, but TOML has no path type: a path is written as a string.
FilePath = Annotated[Path, StrictType(False)]


class Strict(BaseModel):
    # extra="forbid": a typo in a key is reported by name instead of silently ignored.
    # strict: `require_api_key = "no"` or `port = "8001"` is an error, not a guess.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def read_toml(path: Path, error: type[ApplianceError], what: str) -> dict[str, Any]:
    """A TOML file as a dict; every way it can fail becomes `error` naming the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}", hint=f"Check the path to the {what}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(
            f"{path}: not valid TOML: {exc}", hint="Fix the syntax at the place named above."
        ) from None
    except OSError as exc:
        raise error(
            f"{path}: cannot read the {what}: {exc.strerror}",
            hint="Check that the file exists and is readable.",
        ) from None


# A quoted value where TOML needs a boolean or a number: say how to write it.
_STRICT_HINTS = {
    "bool_type": "write true or false, without quotes",
    "int_type": "write the number without quotes",
    "float_type": "write the number without quotes",
}


def problems(
    exc: ValidationError,
    model: type[BaseModel],
    source: str | Path,
    *,
    prefix: tuple[str, ...] = (),
    given: Mapping[str, str] | None = None,
    hidden: Collection[str] = (),
) -> list[str]:
    """One line per error of validating `model`: '{source}: {table.key}: {problem}'.

    prefix: the tables above the validated data in the file (('install',) for the install
    section, (name,) for one model of the catalog). given: keys that came from somewhere
    else than the file, and how the person wrote them (a command-line flag): their lines
    read '{given[key]}: {problem}'. hidden: fields never written as keys, left out of the
    keys an unknown key is compared with.
    """
    lines = []
    for err in exc.errors():
        shown, parent = _walk(model, err["loc"])
        key = ".".join((*prefix, *shown)) or "(top level)"
        where = given[key] if given and key in given else f"{source}: {key}"
        lines.append(f"{where}: {_problem(err, parent, hidden)}")
    return lines


def _problem(err: Any, parent: type[BaseModel] | None, hidden: Collection[str]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = [key for key in _keys(parent) if key not in hidden]
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        text = "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")
        return text + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind == "missing":
        return "missing required key"
    if kind in _STRICT_HINTS and isinstance(err["input"], str):
        return f"{err['msg']}; got the string {err['input']!r} ({_STRICT_HINTS[kind]})"
    return str(err["msg"]).removeprefix("Value error, ")


def _keys(model: type[BaseModel] | None) -> list[str]:
    """The keys a person may write in the table `model` validates."""
    if model is None:
        return []
    return [k for k, f in model.model_fields.items() if not f.exclude]


def _walk(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[list[str], Any]:
    """The location as the file spells it (pydantic's union tags dropped), and the model of
    the table that holds its last key."""
    shown: list[str] = []
    options: list[tuple[str | None, Any]] = [(None, model)]
    parent: Any = model
    for part in loc:
        parent = next((t for _, t in options if _is_model(t)), None)
        tagged = {tag: t for tag, t in options if tag is not None}
        field = parent.model_fields.get(str(part)) if parent is not None else None
        if part in tagged:
            # A tagged union: pydantic puts the tag into the location; the file has no such key.
            options = _members(tagged[str(part)])
            continue
        if field is not None:
            options = _members(field.annotation)
        else:
            # A list index or a dict key: what follows is the container's item.
            items = [a for _, t in options for a in typing.get_args(t)[-1:]]
            options = [m for item in items for m in _members(item)]
        shown.append(str(part))
    return shown, parent if _is_model(parent) else None


def _members(annotation: Any) -> list[tuple[str | None, Any]]:
    """(union tag, type) for each type an annotation allows, Annotated and None removed."""
    tag = None
    while typing.get_origin(annotation) is Annotated:
        tag = next((m.tag for m in annotation.__metadata__ if isinstance(m, Tag)), tag)
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [
            m for arg in typing.get_args(annotation) if arg is not type(None) for m in _members(arg)
        ]
    return [(tag, annotation)]


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)
