"""Argument errors as a person would write them.

pydantic names a failed field by its validator path (``vector.list[int].1``
for the second item of the list alternative of ``int | list[int]``); a
client wants ``Invalid parameter 'vector': expected an integer or a list of
integers; item 1 is a string "2"``.  :func:`describe_validation_error`
turns a ``ValidationError`` into such sentences, one per argument, in
QEMU's words where QEMU has them (missing, unexpected), quoting at most a
short piece of what the client sent.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

__all__ = ["describe_validation_error"]


def describe_validation_error(exc: ValidationError) -> str:
    """One sentence per failed argument, as a person would write it.

    QEMU's words where QEMU has them (missing, unexpected); a union such as
    ``int | list[int]`` is one sentence naming the alternatives, and a list
    item is named by its index (``vector[1]``), never by validator paths.
    """
    parts: list[str] = []
    unions: dict[str, tuple[list[str], object, list[str]]] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if not loc:
            parts.append(f"Invalid arguments: {error['msg']}")
            continue
        field = str(loc[0])
        if error["type"] == "missing":
            parts.append(f"Parameter '{_path(loc)}' is missing")
        elif error["type"] == "extra_forbidden":
            parts.append(f"Parameter '{_path(loc)}' is unexpected")
        elif len(loc) > 1 and isinstance(loc[1], str) and loc[1] in _TYPE_WORDS:
            kinds, value, details = unions.setdefault(field, ([], None, []))
            kinds.append(_TYPE_WORDS[loc[1]])
            if len(loc) > 2:  # an item of the list alternative
                details.append(f"item {loc[2]} is {_shown(error['input'])}")
            else:
                unions[field] = (kinds, error["input"], details)
        else:
            parts.append(
                f"Invalid parameter '{_path(loc)}': {error['msg']} (got {_shown(error['input'])})"
            )
    for field, (kinds, value, details) in unions.items():
        got = "; ".join(details) if details else f"got {_shown(value)}"
        parts.append(f"Invalid parameter '{field}': expected {' or '.join(kinds)}; {got}")
    return "; ".join(parts)


_TYPE_WORDS = {
    "int": "an integer",
    "list[int]": "a list of integers",
    "str": "a string",
    "list[str]": "a list of strings",
    "bool": "a boolean",
    "float": "a number",
}


_KIND_WORDS: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _path(loc: tuple[int | str, ...]) -> str:
    """``('vector', 1)`` -> ``vector[1]``; nested fields joined with dots."""
    text = str(loc[0])
    for part in loc[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _shown(value: object) -> str:
    """A value as the person sent it, cut short (it came from the client)."""
    kind = _KIND_WORDS.get(type(value), "a value")
    text = json.dumps(value) if isinstance(value, str | int | float | bool) else ""
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}" if text else kind
