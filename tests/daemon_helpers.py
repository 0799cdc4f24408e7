"""Shared parts for the daemon and CLI tests (and the daemon benchmark).

Everything here is real: configs written as TOML files, ``indicators run``
started as a subprocess, ``qemu.qmp.QMPClient`` clients on the control
socket, raw unix-socket clients for what a QMPClient will not send.

    with running_daemon(tmp_path, daemon_config(sock)) as daemon:
        async with qmp_client(daemon.socket) as client:
            await client.execute("notify", {"device": "net0", "vector": 1})
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.guestmem import GuestMemory
from indicators.memop import EmulatedBackend, MemopError

TIMEOUT = 10.0
MEMORY = 1 << 20

#: Where the devices of :func:`daemon_config` put their bits.
NET_SUMMARY, NET_DSCI = 0x10000, 0x10100
PCI_SUMMARY, PCI_AIBV = 0x10010, 0x10200
ROUTE_SUMMARY, ROUTE_IND = 0x10020, 0x10300
LOCKED_PAGE = 0x20000  # storage key 0x30 (ACC 3); the device's access key is 5


def devices() -> list[dict[str, Any]]:
    """Four devices: virtio-ccw, a suppressible zPCI function, a KVM route, a keyed device."""
    return [
        {
            "name": "net0",
            "kind": "virtio-ccw",
            "summary_indicator": NET_SUMMARY,
            "device_indicator": NET_DSCI,
            "vectors": 64,
            "isc": 3,
        },
        {
            "name": "pci0",
            "kind": "zpci",
            "aisb": PCI_SUMMARY,
            "aibv": PCI_AIBV,
            "noi": 32,
            "isc": 2,
        },
        {
            "name": "route0",
            "kind": "kvm-route",
            "summary_addr": ROUTE_SUMMARY,
            "ind_addr": ROUTE_IND,
            "vectors": 4,
            "adapter_id": 0x40,
            "isc": 5,
        },
        {
            "name": "locked",
            "kind": "virtio-ccw",
            "summary_indicator": LOCKED_PAGE,
            "device_indicator": LOCKED_PAGE + 0x100,
            "vectors": 4,
            "isc": 4,
            "key": 5,
        },
    ]


def daemon_config(
    socket_path: str | Path, *, ram: str | Path | None = None, **sections: Any
) -> dict[str, Any]:
    """A whole raw config: emulated backend (anonymous or ``ram``), :func:`devices`."""
    backend: dict[str, Any] = {
        "kind": "emulated",
        "memory_size": MEMORY,
        "storage_keys": {hex(LOCKED_PAGE): 0x30},
    }
    if ram is not None:
        backend["ram"] = str(ram)
    raw: dict[str, Any] = {
        "backend": backend,
        "control": {"socket": str(socket_path)},
        "devices": devices(),
    }
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value} if isinstance(value, dict) else value
    return raw


# ------------------------------------------------------------------ TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no TOML for {value!r}")


def to_toml(raw: dict[str, Any]) -> str:
    """Tables and arrays of tables for the config's two levels; deeper dicts inline."""
    lines: list[str] = []
    for name, value in raw.items():
        if isinstance(value, dict):
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(v)}" for key, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                lines.append(f"[[{name}]]")
                lines.extend(f"{key} = {_toml_value(v)}" for key, v in table.items())
        else:
            lines.insert(0, f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """Write ``raw`` as a TOML config file at ``path``."""
    path.write_text(to_toml(raw))
    return path


# ------------------------------------------------------------ subprocesses


def indicators_command(*args: str) -> list[str]:
    """The ``indicators`` console script, run with this interpreter."""
    return [sys.executable, "-m", "indicators.cli", *args]


@dataclass
class Daemon:
    """An ``indicators run`` subprocess and where it serves."""

    process: subprocess.Popen[bytes]
    socket: str
    config: Path
    log: Path

    def logs(self) -> str:
        """Everything the daemon logged so far."""
        return self.log.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the daemon."""
        self.process.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the daemon to exit; its exit code."""
        return self.process.wait(timeout)


def _serving(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        probe.settimeout(TIMEOUT)
        return b"QMP" in probe.recv(4096)  # the greeting: it is up and admits us


@contextlib.contextmanager
def running_daemon(directory: Path, raw: dict[str, Any], *extra: str) -> Iterator[Daemon]:
    """Start ``indicators run`` on ``raw`` (written to ``directory``) and wait until it serves."""
    config = write_config(directory / "daemon.toml", raw)
    log = directory / "daemon.log"
    path = raw["control"]["socket"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            indicators_command("run", "--config", str(config), *extra),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(process, path, config, log)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _serving(path):
            if process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {process.returncode}:\n{daemon.logs()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not serve {path}:\n{daemon.logs()}")
            time.sleep(0.02)
        yield daemon
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ----------------------------------------------------------------- clients


class Client(QMPClient):
    """A ``QMPClient`` whose results are typed ``Any`` (JSON), for terse assertions."""

    async def execute(
        self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False
    ) -> Any:
        """:meth:`QMPClient.execute`."""
        return await super().execute(cmd, arguments, oob)


@contextlib.asynccontextmanager
async def qmp_client(
    path: str, name: str = "test", *, negotiate: bool = True
) -> AsyncIterator[Client]:
    """A connected (by default negotiated) :class:`Client`; disconnects quietly when the
    server left first (disconnect() would re-raise how the link ended)."""
    client = Client(name)
    client.negotiate = negotiate
    await asyncio.wait_for(client.connect(path), TIMEOUT)
    try:
        yield client
    finally:
        with contextlib.suppress(EOFError, OSError):
            await client.disconnect()


class RawClient:
    """Bytes in, reply lines out: for what a QMPClient will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str, *, negotiate: bool = True, limit: int = 1 << 20) -> RawClient:
        """Connect, read the greeting and (by default) negotiate; ``limit`` bounds how
        much the client buffers before it stops reading the socket."""
        raw = cls(*await asyncio.open_unix_connection(path, limit=limit))
        assert "QMP" in await raw.recv()
        if negotiate:
            assert await raw.execute("qmp_capabilities") == {"return": {}}
        return raw

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.writer.write(data)

    async def recv(self) -> dict[str, Any]:
        """The next message (events included)."""
        line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        assert line.endswith(b"\r\n"), line
        message: dict[str, Any] = json.loads(line)
        return message

    async def reply(self) -> dict[str, Any]:
        """The next reply, skipping events."""
        while "event" in (message := await self.recv()):
            pass
        return message

    async def execute(self, command: str, **request: Any) -> dict[str, Any]:
        """Send one request and return its reply."""
        self.send(json.dumps({"execute": command, **request}).encode() + b"\n")
        return await self.reply()

    async def at_eof(self) -> bool:
        """Whether the server hung up (after anything still unread)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), TIMEOUT):
                pass
        except ConnectionResetError:
            pass
        return True

    async def close(self) -> None:
        """Hang up."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def bit_of(gaddr: int, number: int) -> tuple[int, int]:
    """Byte and MSB-0 mask of bit ``number`` counted from ``gaddr``."""
    return gaddr + number // 8, 0x80 >> (number % 8)


def eventfd_writer(fd: int, count: int, *, wait_for_go: int | None = None) -> str:
    """Python source for a child that writes ``count`` times to eventfd ``fd``.

    With ``wait_for_go`` (a pipe's read end) it writes ``count - 1`` times,
    waits for one byte on the pipe, then writes the last time.
    """
    if wait_for_go is None:
        return f"import os\nfor _ in range({count}):\n    os.eventfd_write({fd}, 1)\n"
    return (
        "import os\n"
        f"for _ in range({count - 1}):\n    os.eventfd_write({fd}, 1)\n"
        f"os.read({wait_for_go}, 1)\n"
        f"os.eventfd_write({fd}, 1)\n"
    )


def kill_quietly(process: subprocess.Popen[Any]) -> None:
    """Kill ``process`` (ours) if it still runs."""
    if process.poll() is None:
        process.kill()
        process.wait()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------- the daemon in-process


async def start_service(tmp_path: Path, **sections: Any) -> Service:
    """A :class:`Service` started from :func:`daemon_config` written to a TOML file
    (so that a SIGHUP reload has a file to read), its socket in ``tmp_path``."""
    raw = daemon_config(tmp_path / "control.sock", **sections)
    path = write_config(tmp_path / "daemon.toml", raw)
    service = Service(parse_config(raw, "<test>"), config_path=str(path))
    await service.start()
    return service


def memory_of(service: Service) -> GuestMemory:
    """The guest memory behind a started service's emulated backend."""
    assert service.wiring is not None
    backend = service.wiring.backend
    assert isinstance(backend, EmulatedBackend)
    return backend.memory


def writable(service: Service, gaddr: int, mask: int) -> bool:
    """Whether the write guard lets ``mask`` at ``gaddr`` change (a real cmpxchg of
    it, put back at once); a refusal must be the guard's EPERM."""
    backend = service.engine.backend
    old = backend.read(gaddr, 1)[0]
    try:
        backend.cmpxchg(gaddr, 1, old, old ^ mask)
    except MemopError as exc:
        assert exc.errno == errno.EPERM, exc
        return False
    backend.cmpxchg(gaddr, 1, old ^ mask, old)
    return True

