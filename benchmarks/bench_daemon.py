"""The daemon through a Python QMP client: latency and throughput against a no-op.

One ``indicators run`` subprocess (``rig.py``) serves every measurement, all
with a ``qemu.qmp.QMPClient`` (what a Python client sees; its own asyncio
machinery adds to every round trip):

- ``query-version``: a round trip that does nothing, the yardstick;
- ``notify`` with one vector per command, and with 64 vectors per command;
- an eventfd attached to a vector, written by this process as fast as it
  can: writes per second until the daemon has applied them all.

Latency is one client, one command at a time; before each command the dsci
and summary bytes are cleared (the guest consumed them), so every notify is
a real 0 -> 1 edge with an interrupt.  Throughput is ``--clients`` clients in
this process, each one command at a time, with the bits left set (the cheap
merged path), so it mostly measures the socket and the clients.

The daemon's own latency against its floors (raw socket, eventfd, p50 to
p99.9) is ``bench_latency.py``.

    .venv/bin/python benchmarks/bench_daemon.py [--seconds 1.0] [--clients 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from rig import BATCH, DSCI, MEMORY, SUMMARY, clear, distribution, percentile, start_daemon

from indicators.guestmem import GuestMemory


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


# ------------------------------------------------------------ measurements


async def connect(path: str, name: str = "bench") -> QMPClient:
    """A negotiated qemu.qmp client."""
    client = QMPClient(name)
    await client.connect(path)
    return client


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


async def attach_eventfd(client: QMPClient, fd: int) -> None:
    """Pass ``fd`` and attach it to ev0 vector 0."""
    client.send_fd_scm(fd)
    await client.execute("getfd", {"fdname": "bench"})
    await client.execute("attach-eventfd", {"device": "ev0", "vector": 0, "fdname": "bench"})


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


async def bench(path: str, ram: str, seconds: float, clients: int) -> list[Row]:
    """Every row, one after the other."""
    memory = GuestMemory(MEMORY, ram)
    client = await connect(path)
    try:
        noop = Row("query-version (qemu.qmp no-op)", 0)
        single = Row("notify, 1 vector per command", 1)
        batch = Row(f"notify, {BATCH} vectors per command", BATCH)
        eventfd = Row("eventfd writes, throughput", 1)
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
            writes = 200_000
            rate, reads = await eventfd_throughput(client, fd, writes)
            eventfd.commands_per_s = eventfd.notifications_per_s = rate
            eventfd.note = (
                f"{writes:,} writes applied as "
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
    return rows


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
