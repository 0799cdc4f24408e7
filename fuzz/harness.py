"""Fuzz targets: the control protocol's message decoder and the config loader.

Each target takes bytes and must either accept them or reject them with the
error type the daemon answers with; anything else (another exception, a
reply that is not well-formed JSON) is a finding.  The same functions run
under atheris (``make fuzz``, coverage-guided) and under hypothesis in the
test suite (``tests/test_fuzz.py``, a short run).
"""

from __future__ import annotations

import json
import tomllib

from indicators.config import ConfigError, parse_config
from indicators.daemon.commands import COMMANDS, DeviceAddArgs, device_spec
from indicators.daemon.qmp_wire import (
    FramingError,
    JsonFramer,
    QmpCommandError,
    Request,
    encode,
    error_reply,
    parse_request,
    return_reply,
    validate_arguments,
)

#: Every daemon command's argument model, from the one command table.
MODELS = {spec.name: spec.args for spec in COMMANDS}


def _check_reply(reply: dict[str, object]) -> None:
    text = encode(reply)
    decoded = json.loads(text)
    assert isinstance(decoded, dict) and ("return" in decoded or "error" in decoded), decoded


def decoder(data: bytes, max_message: int = 4096) -> int:
    """Feed ``data`` (in two chunks) to the framer and answer every frame; return replies."""
    framer = JsonFramer(max_message)
    replies = 0
    middle = len(data) // 2
    for chunk in (data[:middle], data[middle:]):
        for frame in framer.feed(chunk):
            if isinstance(frame, FramingError):
                _check_reply(error_reply(frame, {}))
                return replies + 1
            if isinstance(frame, QmpCommandError):
                _check_reply(error_reply(frame, {}))
                replies += 1
                continue
            echo, request = parse_request(frame)
            if isinstance(request, Request) and request.command in MODELS:
                try:
                    args = validate_arguments(MODELS[request.command], request.arguments)
                    if isinstance(args, DeviceAddArgs):  # the device itself: the config's model
                        device_spec(dict(args.model_extra or {}))
                    _check_reply(return_reply({}, echo))
                except QmpCommandError as exc:
                    _check_reply(error_reply(exc, echo))
            elif isinstance(request, QmpCommandError):
                _check_reply(error_reply(request, echo))
            replies += 1
    return replies


def config(data: bytes) -> bool:
    """Load ``data`` as a TOML config: valid, or refused with ConfigError / a TOML error."""
    try:
        raw = tomllib.loads(data.decode("utf-8", errors="replace"))
    except tomllib.TOMLDecodeError:
        return False
    try:
        parse_config(raw, "<fuzz>")
    except ConfigError as exc:
        assert exc.errors and all(where and what for where, what in exc.errors), exc
        return False
    return True
