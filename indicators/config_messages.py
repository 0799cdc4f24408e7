"""pydantic's validation errors as a person reads them.

:func:`field_errors` turns a :class:`pydantic.ValidationError` into
``(where, what)`` pairs: ``where`` names a device by its name instead of its
index, drops the union tags pydantic puts in locations (``backend.emulated``
reads ``backend``) and quotes odd keys; ``what`` adds the value given and,
for an unknown field or kind, the nearest known one ("did you mean").  The
models are passed in, so the models module can import this one.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["Problem", "field_errors", "location_step"]

#: ``(where, what)``: the section or device and field, then the rule and the value.
Problem = tuple[str, str]


def field_errors(exc: ValidationError, raw: Any, root: type[BaseModel]) -> list[Problem]:
    """pydantic's errors as ``(where, what)``: device names, the value given, near misses."""
    problems: list[Problem] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        what = error["msg"]
        if error["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            what += f" (given {_shown(error.get('input'))})"
            what += _did_you_mean(loc[-1], _fields_at(root, loc[:-1]))
        elif error["type"] == "union_tag_not_found":
            # A section told apart by ``kind`` without one: name the field and its values.
            loc = (*loc, "kind")
            what = f"Field required (one of {', '.join(map(repr, _tags_at(root, loc[:-1])))})"
        elif error["type"] == "union_tag_invalid":
            tags = _tags_at(root, loc)
            given = str((error.get("ctx") or {}).get("tag", ""))
            what = f"kind {given!r} is not one of {', '.join(map(repr, tags))}"
            what += _did_you_mean(given, tags)
        elif error["type"] == "value_error":
            what = what.removeprefix("Value error, ")  # our validators name the value
        elif error["type"] != "missing":
            what += f" (given {_shown(error.get('input'))})"
        problems.append((_where(loc, raw, root), what))
    return problems


def _did_you_mean(given: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _shown(value: Any) -> str:
    """A value as the user wrote it, short: addresses in hex."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 4096:
        return hex(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(loc: tuple[int | str, ...], raw: Any, root: type[BaseModel]) -> str:
    """Render a pydantic location: a device by its name, no union tags."""
    parts: list[str] = []
    models: list[type[BaseModel]] = [root]
    node: Any = raw
    for index, step in enumerate(loc):
        tagged = _tagged(models, step)
        if tagged:
            models = tagged  # the discriminator's step: the user wrote it as `kind`
            continue
        if isinstance(step, int) and index == 1 and loc[0] == "devices":
            parts.pop()  # "devices" + index read better as the device's name
            name = node[step].get("name") if _indexable(node, step) else None
            parts.append(
                f"device {name!r}" if isinstance(name, str) and name else f"devices[{step}]"
            )
        elif isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(location_step(step))
        models = _step(models, step)
        node = node[step] if _indexable(node, step) else None
    text = ".".join(parts).replace(".[", "[")
    return text or "(top level)"


def _indexable(node: Any, step: int | str) -> bool:
    if isinstance(step, int):
        return isinstance(node, list) and 0 <= step < len(node) and isinstance(node[step], dict)
    return isinstance(node, dict) and step in node


def location_step(part: int | str) -> str:
    """One location step: names as they are, odd keys (empty, dotted, spaced) quoted."""
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else repr(text)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation can hold (through Annotated, unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _step(models: list[type[BaseModel]], step: int | str) -> list[type[BaseModel]]:
    if isinstance(step, int):
        return models  # a list item: the same models as the list
    found: list[type[BaseModel]] = []
    for model in models:
        field = model.model_fields.get(step)
        if field is not None:
            found.extend(_models_in(field.annotation))
    return found


def _tagged(models: list[type[BaseModel]], step: int | str) -> list[type[BaseModel]]:
    """The union member ``step`` names, when ``step`` is a discriminator's tag."""
    if len(models) < 2 or not isinstance(step, str):
        return []  # not a union: ``step`` is a field, even one spelled like a kind
    return [model for model in models if _tag(model) == step]


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    return str(typing.get_args(field.annotation)[0])


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[type[BaseModel]]:
    models = [root]
    for step in loc:
        tagged = _tagged(models, step)
        models = tagged or _step(models, step)
    return models


def _fields_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    return sorted({name for model in _walk(root, loc) for name in model.model_fields})


def _tags_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    return [tag for model in _walk(root, loc) if (tag := _tag(model)) is not None]
