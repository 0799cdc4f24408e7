"""QMP wire format: framing, request checks, replies, events, argument errors.

This module is the value layer under :mod:`indicators.daemon.qmp_server`; it
does no I/O.  It speaks exactly what QEMU's monitor speaks, so that
``qemu.qmp.QMPClient`` (and any other QMP client) cannot tell the difference:

- :class:`JsonFramer` cuts a byte stream into JSON values the way QEMU's
  json-streamer does (by bracket depth, not by line), so objects may be
  separated by any whitespace or none.  A value that is not valid JSON
  becomes a :class:`QmpCommandError` ("JSON parse error, ...") and the
  stream resynchronises after it; a value over the size or nesting limit
  becomes a :class:`FramingError`, after which the stream cannot be trusted.
- :func:`parse_request` checks a value against QEMU's request rules
  (``execute``, ``arguments``, ``id``) and returns the ``id`` to echo.
- :func:`validate_arguments` runs a pydantic model (normally a subclass of
  :class:`QmpArgs`: strict, unknown members rejected) and turns a
  ``ValidationError`` into a ``GenericError`` that names each field.
- :func:`encode` serialises one message as one ``\\r\\n``-terminated line.

    framer = JsonFramer(max_message=65536)
    for frame in framer.feed(b'{"execute": "qmp_capabilities"}\\n'):
        echo, request = parse_request(frame)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "COMMAND_NOT_FOUND",
    "GENERIC_ERROR",
    "FramingError",
    "JsonFramer",
    "QmpArgs",
    "QmpCommandError",
    "Request",
    "decode_json",
    "describe_validation_error",
    "encode",
    "error_reply",
    "event_message",
    "greeting_message",
    "parse_request",
    "result_value",
    "return_reply",
    "timestamp",
    "validate_arguments",
    "version_info",
]

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

_WHITESPACE = frozenset(b" \t\r\n")
_DELIMITERS = frozenset(b' \t\r\n{}[]":,')
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_REQUEST_MEMBERS = ("execute", "arguments", "id")


class QmpCommandError(Exception):
    """A failure answered as ``{"error": {"class": error_class, "desc": desc}}``.

    Command handlers raise it to fail with a chosen class and text; any other
    exception from a handler is answered as an internal ``GenericError``.
    """

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class FramingError(QmpCommandError):
    """Input the framer cannot resynchronise after (too large, nested too deep)."""


class QmpArgs(BaseModel):
    """Base for command argument models: strict types, unknown members rejected.

    QEMU rejects ``"5"`` for an integer and any argument it does not know;
    ``strict`` and ``extra="forbid"`` give the same behaviour.  Give a field
    an alias for a QMP name that is not a Python identifier (``"dev-id"``).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True, slots=True)
class Request:
    """A checked ``{"execute": command, "arguments": {...}}`` request."""

    command: str
    arguments: dict[str, object]


class JsonFramer:
    """Splits a byte stream into JSON values by tracking string and bracket state.

    ``feed`` returns, in order, each complete value (parsed), each invalid one
    (a :class:`QmpCommandError`), and at most one final :class:`FramingError`
    after which the framer must not be fed again.
    """

    def __init__(self, max_message: int, max_depth: int = 64) -> None:
        self._max_message = max_message
        self._max_depth = max_depth
        self._buf = bytearray()
        self._start = 0  # first byte of the value being scanned
        self._pos = 0  # next byte to scan
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # inside a top-level number or keyword

    def feed(self, data: bytes) -> list[object]:
        """Append ``data`` and return the values it completes."""
        self._buf += data
        frames: list[object] = []
        try:
            while (end := self._scan()) is not None:
                frames.append(self._take(end))
        except FramingError as exc:
            frames.append(exc)
            return frames
        del self._buf[: self._start]
        self._pos -= self._start
        self._start = 0
        if self._pos - self._start > self._max_message:
            frames.append(self._too_large())
        return frames

    def _take(self, end: int) -> object:
        chunk = bytes(self._buf[self._start : end])
        self._start = self._pos = end
        if len(chunk) > self._max_message:
            raise self._too_large()
        return decode_json(chunk)

    def _too_large(self) -> FramingError:
        return FramingError(f"JSON message exceeds the limit of {self._max_message} bytes")

    def _scan(self) -> int | None:
        """Return the end of the next complete value, or None when more input is needed."""
        buf, i = self._buf, self._pos
        while i < len(buf):
            c = buf[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == _BACKSLASH:
                    self._escape = True
                elif c == _QUOTE:
                    self._in_string = False
                    if self._depth == 0:
                        return i + 1
            elif self._bare:
                if c in _DELIMITERS:
                    self._bare = False
                    return i
            elif c in _WHITESPACE:
                if self._depth == 0:
                    self._start = i + 1
            elif c in _OPEN:
                self._depth += 1
                if self._depth > self._max_depth:
                    raise FramingError("JSON nesting depth limit exceeded")
            elif c in _CLOSE:
                if self._depth <= 1:
                    self._depth = 0
                    return i + 1
                self._depth -= 1
            elif c == _QUOTE:
                self._in_string = True
            elif self._depth == 0:
                self._bare = True
            i += 1
        self._pos = i
        return None


def decode_json(chunk: bytes) -> object:
    """Parse one JSON value as QEMU would, or return the error to answer."""
    try:
        return json.loads(chunk, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        return QmpCommandError(f"JSON parse error, {exc.msg}")
    except ValueError as exc:  # includes UnicodeDecodeError
        return QmpCommandError(f"JSON parse error, {exc}")


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid keyword '{name}'")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def parse_request(value: object) -> tuple[dict[str, object], Request | QmpCommandError]:
    """Check ``value`` as a QMP request; return the ``{"id": ...}`` to echo and the outcome."""
    if not isinstance(value, dict):
        return {}, QmpCommandError("QMP input must be a JSON object")
    echo = {"id": value["id"]} if "id" in value else {}
    for member in value:
        if member == "exec-oob":
            return echo, QmpCommandError("Out-of-band execution is not supported")
        if member not in _REQUEST_MEMBERS:
            return echo, QmpCommandError(f"QMP input member '{member}' is unexpected")
    command = value.get("execute")
    if command is None:
        return echo, QmpCommandError("QMP input lacks member 'execute'")
    if not isinstance(command, str):
        return echo, QmpCommandError("QMP input member 'execute' must be a string")
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return echo, QmpCommandError("QMP input member 'arguments' must be an object")
    return echo, Request(command, arguments)


def validate_arguments(
    model: type[BaseModel] | None, arguments: dict[str, object]
) -> BaseModel | None:
    """Return ``arguments`` validated by ``model`` (None: no arguments allowed)."""
    if model is None:
        if arguments:
            raise QmpCommandError(f"Parameter '{next(iter(arguments))}' is unexpected")
        return None
    try:
        # JSON mode: strict models still take enum values and arrays for tuples.
        return model.model_validate_json(json.dumps(arguments))
    except ValidationError as exc:
        raise QmpCommandError(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One sentence per failed field, in QEMU's words where QEMU has them."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        if not where:
            parts.append(f"Invalid arguments: {error['msg']}")
        elif error["type"] == "missing":
            parts.append(f"Parameter '{where}' is missing")
        elif error["type"] == "extra_forbidden":
            parts.append(f"Parameter '{where}' is unexpected")
        else:
            parts.append(f"Invalid parameter '{where}': {error['msg']}")
    return "; ".join(parts)


def encode(message: Mapping[str, object]) -> bytes:
    """Serialise one message as one line, terminated like QEMU's (``\\r\\n``)."""
    return json.dumps(message).encode() + b"\r\n"


def result_value(result: object) -> object:
    """A handler's result as JSON: None is ``{}``, a pydantic model is dumped in JSON mode."""
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json", by_alias=True)
    return result


def return_reply(value: object, echo: Mapping[str, object]) -> dict[str, object]:
    """``{"return": value}`` plus the request's id."""
    return {"return": value, **echo}


def error_reply(error: QmpCommandError, echo: Mapping[str, object]) -> dict[str, object]:
    """``{"error": {"class", "desc"}}`` plus the request's id."""
    return {"error": {"class": error.error_class, "desc": error.desc}, **echo}


def timestamp(now: float | None = None) -> dict[str, int]:
    """QEMU's event timestamp: wall-clock seconds and microseconds."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000}


def event_message(
    name: str, data: Mapping[str, object] | None, stamp: Mapping[str, int]
) -> dict[str, object]:
    """``{"event", "data", "timestamp"}``; ``data`` is left out when None, as QEMU does."""
    message: dict[str, object] = {"event": name}
    if data is not None:
        message["data"] = data
    message["timestamp"] = stamp
    return message


def version_info(version: tuple[int, int, int], package: str) -> dict[str, object]:
    """The ``query-version`` value (also the greeting's ``version``)."""
    major, minor, micro = version
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package}


def greeting_message(
    version: tuple[int, int, int], package: str, capabilities: Sequence[str]
) -> dict[str, object]:
    """The greeting a server sends first on every connection."""
    return {"QMP": {"version": version_info(version, package), "capabilities": list(capabilities)}}
