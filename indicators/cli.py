"""The ``indicators`` command line.

indicators run --config FILE         the service (systemd-friendly)
indicators config check FILE         validate a config, print a summary
indicators config schema             the config's JSON Schema
indicators status --socket PATH      adapters and statistics as a table
indicators notify --socket PATH DEVICE VECTOR...
                                     (both: --connect-timeout SECONDS for the greeting)
indicators demo                      the embedded default, with live progress
indicators libvirt-snippet NAME      the XML a libvirt domain needs for a daemon

Exit codes: 0 success; 1 a runtime failure (the config is fine, but the
host, a resource or the daemon refused: one line on stderr names the path,
address or device); 2 a bad config or command line (every problem listed,
each naming the section or device and the field); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
from typing import Any

from qemu.qmp import ConnectError, QMPClient, QMPError

from .config import Config, load_config
from .daemon.libvirt import add_snippet_command
from .errors import IndicatorsError, ResourceError
from .statusview import format_status

__all__ = ["main"]


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields of failures."""

    FIELDS = ("adapter", "device", "vector", "where", "gaddr", "size", "key", "code")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from .daemon.service import Service

    _setup_logging(args.log_level, args.log_json)
    config = load_config(args.config)
    asyncio.run(Service(config, config_path=args.config).run())
    # Stopped and drained: a late SIGTERM (a hook's after a manager's) must not turn
    # the clean exit into a death by signal while the interpreter shuts down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    from .adapters import build_model

    model = build_model(config)
    print(f"{args.file}: ok, backend {config.backend.kind}, {len(model.devices)} devices "
          f"on {len(model.adapters)} adapters")  # fmt: skip
    for adapter in model.adapters.values():
        names = ", ".join(d.name for d in adapter.devices)
        print(f"  adapter {adapter.id} ({adapter.kind}, isc {adapter.isc}): {names}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(Config.model_json_schema(), indent=2))
    return 0


#: Seconds ``status`` and ``notify`` wait for the daemon's greeting (``--connect-timeout``).
CONNECT_TIMEOUT = 10.0


async def _client(socket_path: str, timeout: float = CONNECT_TIMEOUT) -> QMPClient:
    client = QMPClient("indicators-cli")
    try:
        await asyncio.wait_for(client.connect(socket_path), timeout)
    except TimeoutError:
        # Something listens there but says nothing: not a daemon, or a hung one.
        await client.disconnect()
        raise ResourceError(
            "daemon socket", socket_path, f"no QMP greeting within {timeout:g} s", action="reach"
        ) from None
    except ConnectError as exc:
        if isinstance(exc.exc, OSError):
            raise ResourceError.from_os_error(
                "daemon socket", socket_path, exc.exc, action="reach"
            ) from None
        # A peer that answered something else: one line of what it said, at most.
        said = str(exc).splitlines()[0] if str(exc) else type(exc.exc).__name__
        raise ResourceError(
            "daemon socket", socket_path, f"it does not speak QMP ({said})", action="reach"
        ) from None
    return client


async def _status(socket_path: str, timeout: float) -> str:
    client = await _client(socket_path, timeout)
    try:
        adapters = await client.execute("query-adapters")
        stats = await client.execute("query-stats")
    finally:
        await client.disconnect()
    return format_status(adapters, stats)


def _cmd_status(args: argparse.Namespace) -> int:
    print(asyncio.run(_status(args.socket, args.connect_timeout)))
    return 0


async def _notify(socket_path: str, device: str, vectors: list[int], timeout: float) -> Any:
    client = await _client(socket_path, timeout)
    try:
        return await client.execute("notify", {"device": device, "vector": vectors})
    finally:
        await client.disconnect()


def _cmd_notify(args: argparse.Namespace) -> int:
    result = asyncio.run(_notify(args.socket, args.device, args.vectors, args.connect_timeout))
    print(json.dumps(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_logging("warning", False)
    return asyncio.run(run_demo(seconds=args.seconds, rate=args.batch))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="indicators", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the service")
    run.add_argument("--config", required=True)
    run.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=("debug", "info", "warning", "error", "critical"),
    )
    run.add_argument("--log-json", action="store_true", help="log JSON lines")
    run.set_defaults(func=_cmd_run)
    config = sub.add_parser("config", help="check a config or print its schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check)
    config_sub.add_parser("schema").set_defaults(func=_cmd_schema)
    status = sub.add_parser("status", help="adapters and statistics of a running daemon")
    status.add_argument("--socket", required=True)
    _connect_timeout(status)
    status.set_defaults(func=_cmd_status)
    notify = sub.add_parser("notify", help="notify vectors of a device")
    notify.add_argument("--socket", required=True)
    _connect_timeout(notify)
    notify.add_argument("device")
    notify.add_argument("vectors", nargs="+", type=int)
    notify.set_defaults(func=_cmd_notify)
    demo = sub.add_parser("demo", help="the emulated default with a simulated guest")
    demo.add_argument("--seconds", type=_positive(float), default=5.0)
    demo.add_argument("--batch", type=_positive(int), default=16, help="vectors per notify command")
    demo.set_defaults(func=_cmd_demo)
    add_snippet_command(sub)
    return parser


def _connect_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect-timeout",
        type=_positive(float),
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the daemon's greeting (default {CONNECT_TIMEOUT:g})",
    )


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` above zero (argparse names the option)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``indicators`` console script (exit codes: module docstring)."""
    args = _parser().parse_args(argv)  # usage errors: argparse's message, exit 2
    try:
        return int(args.func(args))
    except IndicatorsError as exc:
        print(f"indicators: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except (QMPError, OSError) as exc:
        # A daemon's error reply (ExecuteError names device and vector) or an
        # OS failure outside the resources the service names itself.
        print(f"indicators: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
