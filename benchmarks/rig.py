"""What the daemon benchmarks share: a real ``indicators run``, a raw client, statistics.

The daemon runs the emulated backend on a RAM file in a temporary
directory; this process maps the same file (:class:`GuestMemory`) to clear
indicators the way a guest would and to watch bits land.  Device ``net0``
(64 vectors) takes control-socket notifies, ``ev0`` (8 vectors) takes an
eventfd.  A second page of the file (``FLOOR_*``) belongs to nobody: the
bare eventfd floor process (``floor_eventfd.py``) sets its bits there.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from indicators.guestmem import GuestMemory

MEMORY = 1 << 20
SUMMARY, DSCI = 0x10000, 0x10100  # net0: 64 vectors, dsci bytes 0x10100..0x10107
EV_SUMMARY, EV_DSCI = 0x10010, 0x10200  # ev0: the eventfd's device
FLOOR_SUMMARY, FLOOR_DSCI = 0x20010, 0x20200  # the bare floor's bytes, outside every device
BATCH = 64

CONFIG = f"""
[backend]
kind = "emulated"
memory_size = {MEMORY}
ram = "{{ram}}"

[control]
socket = "{{socket}}"

[[devices]]
name = "net0"
kind = "virtio-ccw"
summary_indicator = {SUMMARY}
device_indicator = {DSCI}
vectors = {BATCH}
isc = 3

[[devices]]
name = "ev0"
kind = "virtio-ccw"
summary_indicator = {EV_SUMMARY}
device_indicator = {EV_DSCI}
vectors = 8
isc = 3
"""

#: The plot's CDF points: 1st, 5th, 10th, ..., 90th, 95th, 99th percentile.
CDF_POINTS = (0.01, 0.05, *(q / 100 for q in range(10, 100, 10)), 0.95, 0.99)
#: What every latency row reports.
QUANTILES = {"p50_us": 0.5, "p99_us": 0.99, "p999_us": 0.999}


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def distribution(samples: Sequence[float]) -> list[tuple[float, float]]:
    """``(fraction, microseconds)`` points of the latency distribution."""
    ordered = sorted(samples)
    return [(q, ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6) for q in CDF_POINTS]


def summarize(rounds: list[list[float]]) -> dict[str, Any]:
    """p50/p99/p99.9 (us) of each round, and their medians over the rounds."""
    per_round = {
        name: [percentile(samples, q) * 1e6 for samples in rounds] for name, q in QUANTILES.items()
    }
    result: dict[str, Any] = {name: statistics.median(v) for name, v in per_round.items()}
    result["rounds"] = per_round
    result["samples"] = sum(len(samples) for samples in rounds)
    result["percentiles_us"] = distribution([s for samples in rounds for s in samples])
    return result


def start_daemon(directory: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """``indicators run`` on a RAM file; returns the process, the socket and the RAM path."""
    path, ram = str(directory / "control.sock"), str(directory / "guest.ram")
    config = directory / "daemon.toml"
    config.write_text(CONFIG.format(ram=ram, socket=path))
    command = [sys.executable, "-m", "indicators.cli", "run", "--config", str(config)]
    daemon = subprocess.Popen([*command, "--log-level", "warning"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10.0
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                break
            except OSError:
                pass
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise SystemExit(f"the daemon did not start serving {path}")
        time.sleep(0.02)
    return daemon, path, ram


class RawClient:
    """A blocking QMP client on a plain socket: no event loop, no parsing but the reply's."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        assert b'"QMP"' in self.line()
        self.execute("qmp_capabilities")

    def line(self) -> bytes:
        """The next line the daemon sent."""
        while (end := self.buf.find(b"\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon hung up")
            self.buf += chunk
        line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
        return line

    def reply(self) -> object:
        """The next reply; events before it are skipped."""
        while (line := self.line()).startswith(b'{"event"'):
            pass
        message = json.loads(line)
        if "return" not in message:
            raise RuntimeError(f"the daemon answered {message}")
        return message["return"]

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> object:
        """Send one command and wait for its reply."""
        request = {"execute": command, "arguments": arguments or {}}
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        """Hang up."""
        self.sock.close()


def clear(memory: GuestMemory, dsci: int, size: int, summary: int) -> Callable[[], None]:
    """What the guest does after it consumed everything: dsci bytes and summary zero."""
    zeros = bytes(size)

    def run() -> None:
        memory.write(dsci, zeros)
        memory.write(summary, b"\0")

    return run
