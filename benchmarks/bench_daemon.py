"""The daemon's notify paths against a no-op round trip, in one run.

One ``indicators run`` subprocess (emulated backend whose RAM is a file this
process maps) serves every measurement:

- ``query-version``: a round trip that does nothing, the yardstick;
- ``notify`` with one vector per command, and with 64 vectors per command;
- an eventfd attached to a vector, written by this process (another process
  than the daemon): latency from the write until the bit is visible in the
  mapped RAM, and writes per second until the daemon has applied them all.

Latency is one client, one command at a time, measured twice: with a raw
blocking socket (the daemon's own cost: one ``sendall``, then ``recv`` until
the reply line, skipping the ADAPTER_INTERRUPT event before it) and with a
``qemu.qmp.QMPClient`` (what a Python client sees; its own asyncio machinery
adds to every round trip).  Before each command the dsci and summary bytes
are cleared (the guest consumed them), so every notify is a real 0 -> 1 edge
with an interrupt.  The raw rows run while no other client is connected.

Throughput is ``--clients`` qemu.qmp clients in this process, each one
command at a time, with the bits left set (the cheap merged path), so it
mostly measures the socket and the clients.

    .venv/bin/python benchmarks/bench_daemon.py [--seconds 1.0] [--clients 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from indicators.guestmem import GuestMemory

MEMORY = 1 << 20
SUMMARY, DSCI = 0x10000, 0x10100  # net0: 64 vectors, dsci bytes 0x10100..0x10107
EV_SUMMARY, EV_DSCI = 0x10010, 0x10200  # ev0: the eventfd's device
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


@dataclass
class Row:
    """One line of the table."""

    name: str
    notifications_per_command: int
    p50_us: float | None = None
    p99_us: float | None = None
    commands_per_s: float | None = None
    notifications_per_s: float | None = None
    latency_ratio: float | None = None  # p50 / the same client's query-version p50
    throughput_ratio: float | None = None  # notifications/s / query-version commands/s
    note: str = ""
    #: Latency at the 1st, 5th, 10th, ..., 95th and 99th percentiles (the plot's CDF).
    percentiles_us: list[tuple[float, float]] | None = None


CDF_POINTS = (0.01, 0.05, *(q / 100 for q in range(10, 100, 10)), 0.95, 0.99)


def distribution(samples: list[float]) -> list[tuple[float, float]]:
    """``(fraction, microseconds)`` points of the latency distribution."""
    return [(q, percentile(samples, q) * 1e6) for q in CDF_POINTS]


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ------------------------------------------------------------- the daemon


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


async def connect(path: str, name: str = "bench") -> QMPClient:
    """A negotiated qemu.qmp client."""
    client = QMPClient(name)
    await client.connect(path)
    return client


# ------------------------------------------------------------ measurements


async def latency(
    client: QMPClient,
    command: str,
    arguments: dict[str, Any] | None,
    seconds: float,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """Round trips of one command, one at a time, for ``seconds``; ``before`` runs untimed."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if before is not None:
            before()
        start = time.perf_counter()
        await client.execute(command, arguments)
        samples.append(time.perf_counter() - start)
        if len(samples) % 256 == 0:
            client.events.clear()
    return samples


class RawClient:
    """A blocking QMP client on a plain socket: no event loop, no parsing but the reply's."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        assert b'"QMP"' in self.line()
        self.execute("qmp_capabilities")

    def line(self) -> bytes:
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
        request = {"execute": command, "arguments": arguments or {}}
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def raw_latency(
    client: RawClient,
    command: str,
    arguments: dict[str, Any] | None,
    seconds: float,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """:func:`latency` with the raw client (the request is encoded once, outside the timing)."""
    request = json.dumps({"execute": command, "arguments": arguments or {}}).encode() + b"\n"
    sendall, reply = client.sock.sendall, client.reply
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if before is not None:
            before()
        start = time.perf_counter()
        sendall(request)
        reply()
        samples.append(time.perf_counter() - start)
    return samples


async def throughput(
    path: str, command: str, arguments: dict[str, Any] | None, seconds: float, clients: int
) -> float:
    """Commands per second from ``clients`` clients, each one command at a time."""
    connected = [await connect(path, f"bench{i}") for i in range(clients)]
    counts = [0] * clients

    async def run(index: int, client: QMPClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            await client.execute(command, arguments)
            counts[index] += 1
            if counts[index] % 256 == 0:
                client.events.clear()

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(run(i, c, deadline) for i, c in enumerate(connected)))
    elapsed = time.perf_counter() - start
    for client in connected:
        await client.disconnect()
    return sum(counts) / elapsed


def clear(memory: GuestMemory, dsci: int, size: int, summary: int) -> Callable[[], None]:
    """What the guest does after it consumed everything: dsci bytes and summary zero."""
    zeros = bytes(size)

    def run() -> None:
        memory.write(dsci, zeros)
        memory.write(summary, b"\0")

    return run


async def attach_eventfd(client: QMPClient, fd: int) -> None:
    """Pass ``fd`` and attach it to ev0 vector 0."""
    client.send_fd_scm(fd)
    await client.execute("getfd", {"fdname": "bench"})
    await client.execute("attach-eventfd", {"device": "ev0", "vector": 0, "fdname": "bench"})


def eventfd_latency(fd: int, memory: GuestMemory, seconds: float) -> list[float]:
    """Write once, spin until the bit is in the mapped RAM; repeat for ``seconds``."""
    samples: list[float] = []
    load = memory.load
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        memory.write(EV_DSCI, b"\0")
        memory.write(EV_SUMMARY, b"\0")
        start = time.perf_counter()
        os.eventfd_write(fd, 1)
        spins = 0
        while not load(EV_DSCI, 1) & 0x80:
            spins += 1
            if spins % 100_000 == 0 and time.perf_counter() - start > 5.0:
                raise SystemExit("an eventfd write was not applied within 5 s")
        samples.append(time.perf_counter() - start)
    return samples


async def eventfd_throughput(client: QMPClient, fd: int, writes: int) -> tuple[float, int]:
    """``writes`` writes as fast as this process can; writes/s until all are applied, reads."""
    before = await client.execute("query-stats")
    assert isinstance(before, dict)
    (source,) = before["eventfds"]
    start = time.perf_counter()
    for number in range(writes):
        os.eventfd_write(fd, 1)
        if not number % 1000:
            await asyncio.sleep(0)  # let this client read its events (or be dropped as slow)
    while True:
        stats = await client.execute("query-stats")
        assert isinstance(stats, dict)
        (now,) = stats["eventfds"]
        reads = now["reads"] - source["reads"]
        if (
            now["signals"] - source["signals"] == writes
            and stats["applied"] - before["applied"] == reads
        ):
            return writes / (time.perf_counter() - start), reads


# ------------------------------------------------------------------ report


def bench_raw(path: str, memory: GuestMemory, seconds: float) -> list[Row]:
    """The latency rows with :class:`RawClient`, the only client connected."""
    raw_noop = Row("raw: query-version (no-op)", 0)
    raw_single = Row("raw: notify, 1 vector", 1)
    raw_batch = Row(f"raw: notify, {BATCH} vectors", BATCH)
    one = {"device": "net0", "vector": 5}
    many = {"device": "net0", "vector": list(range(BATCH))}
    cases = [
        (raw_noop, "query-version", None, None),
        (raw_single, "notify", one, clear(memory, DSCI, 1, SUMMARY)),
        (raw_batch, "notify", many, clear(memory, DSCI, BATCH // 8, SUMMARY)),
    ]
    client = RawClient(path)
    try:
        for row, command, arguments, before in cases:
            raw_latency(client, command, arguments, seconds / 10, before)  # warm up
            samples = raw_latency(client, command, arguments, seconds, before)
            row.p50_us, row.p99_us = percentile(samples, 0.5) * 1e6, percentile(samples, 0.99) * 1e6
            row.percentiles_us = distribution(samples)
            row.note = f"{len(samples)} round trips, raw blocking socket"
    finally:
        client.close()
    assert raw_noop.p50_us
    for row in (raw_noop, raw_single, raw_batch):
        assert row.p50_us
        row.latency_ratio = row.p50_us / raw_noop.p50_us
    return [raw_noop, raw_single, raw_batch]


async def bench(path: str, ram: str, seconds: float, clients: int) -> list[Row]:
    memory = GuestMemory(MEMORY, ram)
    raw_rows = bench_raw(path, memory, seconds)
    await asyncio.sleep(0.05)  # let the daemon drop the raw session before the next client
    client = await connect(path)
    try:
        noop = Row("query-version (qemu.qmp no-op)", 0)
        single = Row("notify, 1 vector per command", 1)
        batch = Row(f"notify, {BATCH} vectors per command", BATCH)
        eventfd = Row("eventfd write -> bit in RAM", 1)
        one = {"device": "net0", "vector": 5}
        many = {"device": "net0", "vector": list(range(BATCH))}
        cases = [
            (noop, "query-version", None, None),
            (single, "notify", one, clear(memory, DSCI, 1, SUMMARY)),
            (batch, "notify", many, clear(memory, DSCI, BATCH // 8, SUMMARY)),
        ]
        for row, command, arguments, before in cases:
            await latency(client, command, arguments, seconds / 10, before)  # warm up
            samples = await latency(client, command, arguments, seconds, before)
            row.p50_us, row.p99_us = percentile(samples, 0.5) * 1e6, percentile(samples, 0.99) * 1e6
            row.percentiles_us = distribution(samples)
            row.commands_per_s = await throughput(path, command, arguments, seconds, clients)
            row.notifications_per_s = row.commands_per_s * row.notifications_per_command
            row.note = f"{len(samples)} round trips; {clients} clients for throughput"

        fd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            await attach_eventfd(client, fd)
            # The timing loops below block this event loop, so a connected client
            # could not read the interrupt events and would be dropped as slow:
            # hang up meanwhile (the eventfd stays attached) and come back after.
            await client.disconnect()
            eventfd_latency(fd, memory, seconds / 10)
            samples = eventfd_latency(fd, memory, seconds)
            client = await connect(path)
            eventfd.p50_us = percentile(samples, 0.5) * 1e6
            eventfd.p99_us = percentile(samples, 0.99) * 1e6
            eventfd.percentiles_us = distribution(samples)
            writes = 200_000
            rate, reads = await eventfd_throughput(client, fd, writes)
            eventfd.commands_per_s = eventfd.notifications_per_s = rate
            eventfd.note = (
                f"{len(samples)} writes timed; {writes:,} writes applied as "
                f"{reads:,} notifications (the eventfd counter coalesces)"
            )
        finally:
            os.close(fd)
    finally:
        await client.disconnect()
        memory.close()
    rows = [noop, single, batch, eventfd]
    assert noop.p50_us and noop.commands_per_s
    for row in rows:
        if row.p50_us is not None:
            row.latency_ratio = row.p50_us / noop.p50_us
        if row.notifications_per_s is not None:
            row.throughput_ratio = row.notifications_per_s / noop.commands_per_s
    noop.notifications_per_s = noop.throughput_ratio = None
    return raw_rows + rows


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0].rstrip(",") or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = (
        f"{'path':36} {'p50 us':>8} {'p99 us':>8} {'x no-op':>8} {'cmd/s':>9} "
        f"{'notif/s':>10} {'x no-op':>8}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row.name:36} {_fmt(row.p50_us, '8.1f')} {_fmt(row.p99_us, '8.1f')} "
            f"{_fmt(row.latency_ratio, '8.2f')} {_fmt(row.commands_per_s, '9,.0f')} "
            f"{_fmt(row.notifications_per_s, '10,.0f')} {_fmt(row.throughput_ratio, '8.2f')}"
        )
    lines.append("")
    lines.append(
        "x no-op: latency / the same client's query-version p50; "
        "notifications/s / query-version cmd/s"
    )
    lines.extend(f"  {row.name}: {row.note}" for row in rows if row.note)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=4, help="clients for throughput")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        daemon, path, ram = start_daemon(Path(tmp))
        try:
            rows = asyncio.run(bench(path, ram, args.seconds, args.clients))
        finally:
            daemon.terminate()
            code = daemon.wait(10)
    print(table(rows))
    if args.json:
        result = {
            "seconds": args.seconds,
            "clients": args.clients,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "daemon_exit": code,
            "rows": [asdict(row) for row in rows],
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
