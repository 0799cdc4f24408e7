"""Latency of the daemon's notify paths next to their floors, measured in the same run.

One ``indicators run`` subprocess (see ``rig.py``) and, beside it, the bare
eventfd floor process (``floor_eventfd.py``) on a spare page of the same RAM
file.  Two comparisons, each in interleaved rounds (a round of one side,
then a round of the other, ``--rounds`` times), so a busy spell of the
shared machine hits both sides; each round yields p50, p99 and p99.9, and
the medians over the rounds are what is quoted:

- **eventfd write -> bit visible in the RAM file**: this process writes the
  eventfd and spins on the mapped dsci byte until bit 0x80 shows, for the
  daemon (device ``ev0``, vector 0) and for the floor.  Before every write
  the dsci and summary bytes are cleared (the guest consumed them), so each
  write is a real 0 -> 1 edge with an interrupt; after the dsci bit shows,
  the next write waits (untimed) until the summary bit shows too.  No
  client is connected meanwhile (nobody must read interrupt events).
- **raw socket notify vs the same daemon's no-op round trip**:
  ``query-version`` against ``notify`` of one vector (and of 64), each a
  blocking ``sendall`` then ``recv`` to the reply line, skipping the
  ADAPTER_INTERRUPT event before it; bytes cleared before each notify.

Garbage collection is off in this process while it times.

    .venv/bin/python benchmarks/bench_latency.py [--rounds 7] [--samples 3000] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rig import (
    BATCH,
    DSCI,
    EV_DSCI,
    EV_SUMMARY,
    FLOOR_DSCI,
    FLOOR_SUMMARY,
    MEMORY,
    SUMMARY,
    RawClient,
    clear,
    start_daemon,
    summarize,
)

from indicators.guestmem import GuestMemory

HERE = Path(__file__).resolve().parent


def eventfd_round(fd: int, memory: GuestMemory, dsci: int, summary: int, count: int) -> list[float]:
    """``count`` timed writes: write, spin until the dsci bit is in the mapped RAM."""
    samples: list[float] = []
    load, write, clock = memory.load, memory.write, time.perf_counter
    for _ in range(count):
        write(dsci, b"\0")
        write(summary, b"\0")
        start = clock()
        os.eventfd_write(fd, 1)
        spins = 0
        while not load(dsci, 1) & 0x80:
            spins += 1
            if spins % 100_000 == 0 and clock() - start > 5.0:
                raise SystemExit(f"an eventfd write was not applied at {dsci:#x} within 5 s")
        samples.append(clock() - start)
        while not load(summary, 1):  # untimed: let the last write finish its work
            if clock() - start > 5.0:
                raise SystemExit(f"the summary at {summary:#x} was not set within 5 s")
    return samples


def socket_round(
    client: RawClient, request: bytes, before: Callable[[], None] | None, count: int
) -> list[float]:
    """``count`` round trips of one pre-encoded command, ``before`` untimed ahead of each."""
    samples: list[float] = []
    sendall, reply, clock = client.sock.sendall, client.reply, time.perf_counter
    for _ in range(count):
        if before is not None:
            before()
        start = clock()
        sendall(request)
        reply()
        samples.append(clock() - start)
    return samples


def encode(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """One QMP request line."""
    return json.dumps({"execute": command, "arguments": arguments or {}}).encode() + b"\n"


def attach(path: str, fd: int) -> None:
    """Pass ``fd`` over a raw session and attach it to ev0 vector 0, then hang up."""
    client = RawClient(path)
    try:
        socket.send_fds(client.sock, [encode("getfd", {"fdname": "bench"})], [fd])
        client.reply()
        client.execute("attach-eventfd", {"device": "ev0", "vector": 0, "fdname": "bench"})
    finally:
        client.close()


def start_floor(fd: int, ram: str) -> subprocess.Popen[str]:
    """The bare asyncio floor process, reading its own eventfd."""
    floor = subprocess.Popen(
        [sys.executable, str(HERE / "floor_eventfd.py"), str(fd), ram, str(MEMORY),
         hex(FLOOR_DSCI), hex(FLOOR_SUMMARY)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=(fd,),
    )  # fmt: skip
    assert floor.stdout is not None
    if floor.stdout.readline().strip() != "ready":
        floor.kill()
        raise SystemExit("the eventfd floor process did not start")
    return floor


def bench_eventfd(path: str, ram: str, rounds: int, count: int) -> dict[str, Any]:
    """Daemon and floor, interleaved rounds of ``count`` writes each."""
    daemon_fd, floor_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    memory = GuestMemory(MEMORY, ram)
    floor = start_floor(floor_fd, ram)
    try:
        attach(path, os.dup(daemon_fd))
        time.sleep(0.05)  # the daemon drops the session before the first timed write
        sides = {
            "daemon": (daemon_fd, EV_DSCI, EV_SUMMARY),
            "floor": (floor_fd, FLOOR_DSCI, FLOOR_SUMMARY),
        }
        for fd, dsci, summary in sides.values():  # warm up
            eventfd_round(fd, memory, dsci, summary, count // 10)
        collected: dict[str, list[list[float]]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, (fd, dsci, summary) in sides.items():
                collected[name].append(eventfd_round(fd, memory, dsci, summary, count))
        own = daemon_view(path)
    finally:
        assert floor.stdin is not None
        floor.stdin.close()
        floor.wait(10)
        memory.close()
        os.close(daemon_fd)
        os.close(floor_fd)
    result = {name: summarize(samples) for name, samples in collected.items()}
    result["daemon"]["own_view_us"] = own
    return result


def daemon_view(path: str) -> dict[str, float | str | None]:
    """The daemon's own p50/p99 (accepted -> applied) from ``query-stats``, in us."""
    client = RawClient(path)
    try:
        stats = client.execute("query-stats")
    finally:
        client.close()
    assert isinstance(stats, dict)
    return {
        name: value * 1e6 if isinstance(value, float) else value
        for name, value in ((q, stats.get(f"latency-{q}")) for q in ("p50", "p99"))
    }


def bench_socket(path: str, ram: str, rounds: int, count: int) -> dict[str, Any]:
    """No-op, notify of 1 vector and of 64, interleaved rounds of ``count`` round trips."""
    memory = GuestMemory(MEMORY, ram)
    client = RawClient(path)
    cases = {
        "query-version": (encode("query-version"), None),
        "notify 1 vector": (
            encode("notify", {"device": "net0", "vector": 5}),
            clear(memory, DSCI, 1, SUMMARY),
        ),
        f"notify {BATCH} vectors": (
            encode("notify", {"device": "net0", "vector": list(range(BATCH))}),
            clear(memory, DSCI, BATCH // 8, SUMMARY),
        ),
    }
    try:
        for request, before in cases.values():  # warm up
            socket_round(client, request, before, count // 10)
        collected: dict[str, list[list[float]]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, (request, before) in cases.items():
                collected[name].append(socket_round(client, request, before, count))
    finally:
        client.close()
        memory.close()
    return {name: summarize(samples) for name, samples in collected.items()}


def _us(value: float | str | None) -> str:
    return f"{value:.1f} us" if isinstance(value, float) else str(value)


def report(results: dict[str, Any]) -> str:
    """The table: medians over rounds of each round's p50, p99, p99.9."""
    lines = [f"{'path':34} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'samples':>8}"]
    for group in ("eventfd", "socket"):
        for name, row in results[group].items():
            lines.append(f"{group + ': ' + name:34} {row['p50_us']:8.1f} {row['p99_us']:8.1f} "
                         f"{row['p999_us']:9.1f} {row['samples']:8}")  # fmt: skip
    eventfd, sock = results["eventfd"], results["socket"]
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        ratio = eventfd["daemon"][key] / eventfd["floor"][key]
        lines.append(f"eventfd daemon / floor, {label}: {ratio:.2f}x")
    own = eventfd["daemon"]["own_view_us"]
    lines.append(f"the daemon's own histogram (accepted -> applied): p50 {_us(own['p50'])}, "
                 f"p99 {_us(own['p99'])}")  # fmt: skip
    ratio = sock["notify 1 vector"]["p50_us"] / sock["query-version"]["p50_us"]
    lines.append(f"raw notify / query-version, p50: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per side")
    parser.add_argument("--samples", type=int, default=3000, help="eventfd writes per round")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        daemon, path, ram = start_daemon(Path(tmp))
        gc.disable()
        try:
            results = {
                "eventfd": bench_eventfd(path, ram, args.rounds, args.samples),
                "socket": bench_socket(path, ram, args.rounds, args.samples * 2 // 3),
            }
        finally:
            gc.enable()
            daemon.terminate()
            code = daemon.wait(10)
    results.update(rounds=args.rounds, samples_per_round=args.samples, daemon_exit=code)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
