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
import json.encoder
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from .argerrors import describe_validation_error

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

_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_QUOTE = ord('"')
_LBRACE = ord("{")
_NOT_WHOLE = object()
_BACKSLASH = ord("\\")
_REQUEST_MEMBERS = ("execute", "arguments", "id")
_REQUEST_MEMBER_SET = frozenset(_REQUEST_MEMBERS)

# What the framer skips in one step (possessive: no backtracking):
# - inside a value: bytes that are not brackets or quotes, and complete strings;
_SKIP_NESTED = re.compile(rb'[^"{}\[\]]*+(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"[^"{}\[\]]*+)*+', re.DOTALL)
# - inside a string: everything up to its closing quote (or a final lone backslash);
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
# - between values: whitespace; a top-level number or keyword ends at a delimiter.
_NON_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_DELIMITER = re.compile(rb'[ \t\r\n{}\[\]":,]')


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
        if not self._buf:  # between values: ``data`` is most often exactly one request
            value = self._whole(data)
            if value is not _NOT_WHOLE:
                return [value]
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

    @property
    def partial(self) -> bool:
        """Whether bytes of a value not yet complete are buffered (whitespace is not)."""
        return bool(self._buf[self._start :].strip())

    def _whole(self, data: bytes) -> object:
        """The value ``data`` holds if it is one valid JSON object (then whitespace) that
        the scanner would cut and :func:`decode_json` accept as is; else ``_NOT_WHOLE``.

        ``{`` then a non-zero byte is what ``json.loads`` decodes as UTF-8; counting
        every bracket bounds the depth; a valid object ends where the scanner ends it.
        """
        if not 2 <= len(data) <= self._max_message or data[0] != _LBRACE or not data[1]:
            return _NOT_WHOLE
        if data.count(b"{") + data.count(b"[") > self._max_depth:
            return _NOT_WHOLE
        try:
            text = data.decode("utf-8", "surrogatepass")
            value, end = _DECODER.raw_decode(text)
        except ValueError:  # the scanner's path gives the error to answer
            return _NOT_WHOLE
        if end < len(text) and text[end:].strip(" \t\r\n"):
            return _NOT_WHOLE
        return value

    def _take(self, end: int) -> object:
        chunk = bytes(self._buf[self._start : end])
        self._start = self._pos = end
        if len(chunk) > self._max_message:
            raise self._too_large()
        return decode_json(chunk)

    def _too_large(self) -> FramingError:
        return FramingError(f"JSON message exceeds the limit of {self._max_message} bytes")

    def _scan(self) -> int | None:
        """Return the end of the next complete value, or None when more input is needed.

        The states are those of a byte-by-byte scanner (in a string, after a
        backslash, in a top-level number or keyword, bracket depth); the
        regular expressions only skip the bytes that cannot change them.
        """
        buf, i = self._buf, self._pos
        n = len(buf)
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                i = _STRING_REST.match(buf, i).end()  # type: ignore[union-attr]
                if i == n:
                    break
                i += 1
                if buf[i - 1] == _BACKSLASH:  # the input ends between a backslash and its byte
                    self._escape = True
                    continue
                self._in_string = False
                if self._depth == 0:
                    return i
            elif self._bare:
                end = _DELIMITER.search(buf, i)
                if end is None:
                    i = n
                    break
                self._bare = False
                return end.start()
            elif self._depth == 0:
                value = _NON_WHITESPACE.search(buf, i)
                if value is None:
                    i = self._start = n
                    break
                i = self._start = value.start()
                c = buf[i]
                i += 1
                if c == _QUOTE:
                    self._in_string = True
                elif c in _OPEN:
                    self._enter()
                elif c in _CLOSE:
                    return i
                else:
                    self._bare = True
            else:
                i = _SKIP_NESTED.match(buf, i).end()  # type: ignore[union-attr]
                if i == n:
                    break
                c = buf[i]
                i += 1
                if c == _QUOTE:
                    self._in_string = True
                elif c in _OPEN:
                    self._enter()
                elif self._depth <= 1:
                    self._depth = 0
                    return i
                else:
                    self._depth -= 1
        self._pos = i
        return None

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > self._max_depth:
            raise FramingError("JSON nesting depth limit exceeded")


def decode_json(chunk: bytes) -> object:
    """Parse one JSON value as QEMU would, or return the error to answer."""
    try:
        # json.loads(chunk, ...) without building a decoder per call.
        return _DECODER.decode(chunk.decode(json.detect_encoding(chunk), "surrogatepass"))
    except json.JSONDecodeError as exc:
        return QmpCommandError(f"JSON parse error, {exc.msg}")
    except ValueError as exc:  # includes UnicodeDecodeError
        return QmpCommandError(f"JSON parse error, {exc}")


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid keyword '{name}'")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key '{key}'")
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def parse_request(value: object) -> tuple[dict[str, object], Request | QmpCommandError]:
    """Check ``value`` as a QMP request; return the ``{"id": ...}`` to echo and the outcome."""
    if not isinstance(value, dict):
        return {}, QmpCommandError("QMP input must be a JSON object")
    echo = {"id": value["id"]} if "id" in value else {}
    if not value.keys() <= _REQUEST_MEMBER_SET:  # the first unexpected member is named
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
        return model.__pydantic_validator__.validate_json(_dumps(arguments))  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise QmpCommandError(describe_validation_error(exc)) from exc


def encode(message: Mapping[str, object]) -> bytes:
    """Serialise one message as one line, terminated like QEMU's (``\\r\\n``)."""
    return (_dumps(message) + "\r\n").encode()


def _json_dumps(value: object) -> str:
    return json.dumps(value)


def _make_dumps() -> Callable[[object], str]:
    """``json.dumps`` with its default settings, minus the encoder it builds per call.

    The markers dict is its circular-reference check; an encoding that fails
    part way leaves entries behind, so it is emptied then.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: nothing to save
        return _json_dumps
    markers: dict[int, object] = {}
    defaults = json.JSONEncoder()
    encoder = make(
        markers,
        defaults.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        defaults.key_separator,
        defaults.item_separator,
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )

    def dumps(value: object) -> str:
        try:
            return "".join(encoder(value, 0))
        except BaseException:
            markers.clear()
            raise

    return dumps


_dumps = _make_dumps()


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
