"""Scale and contention: the engine with 1, 100 and 1,000 adapters, and with a guest clearing.

Scale: each adapter is a KVM route (its own adapter id) with 8 devices of
8 vectors; every configuration is measured in a fresh subprocess for
start-up time (config validation, model, engine) and resident memory, then
for the cost per notification of (a) single notifications to random devices
of all adapters and (b) bursts of 1,000 to the 8 devices of adapter 0 (the
same memory work in every configuration, so only the model's size differs),
each the best of interleaved rounds.

Contention: bursts while a SimulatedGuest thread clears the same indicators;
notifications per second of wall time and per CPU second of the notifying
thread (the guest thread spins for the GIL, so wall time mostly measures
how the interpreter shared it), retries (no-exchange rounds) per
notification; the median of three runs.

    .venv/bin/python benchmarks/bench_scale.py [--seconds 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

MEMORY = 64 << 20
SUMMARY, DSCI = 0x10000, 0x100000
DEVICES_PER_ADAPTER, VECTORS = 8, 8


def scale_config(adapters: int) -> dict[str, Any]:
    """``adapters`` KVM routes of 8 devices x 8 vectors; one summary byte per adapter."""
    devices = []
    for adapter in range(adapters):
        for device in range(DEVICES_PER_ADAPTER):
            number = adapter * DEVICES_PER_ADAPTER + device
            devices.append({
                "name": f"a{adapter}d{device}",
                "kind": "kvm-route",
                "summary_addr": SUMMARY + adapter,
                "ind_addr": DSCI + number,
                "vectors": VECTORS,
                "adapter_id": adapter,
                "isc": adapter % 8,
            })  # fmt: skip
    return {"backend": {"kind": "emulated", "memory_size": MEMORY}, "devices": devices}


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _measure(adapters: int, seconds: float) -> dict[str, Any]:
    from indicators.adapters import build_model
    from indicators.config import parse_config
    from indicators.engine import Engine
    from indicators.memop import EmulatedBackend
    from indicators.sinks import QueueSink

    raw = scale_config(adapters)
    rss_before = _rss_kib()
    start = time.perf_counter()
    model = build_model(parse_config(raw))
    backend = EmulatedBackend(MEMORY)
    engine = Engine(model, backend, QueueSink())
    startup = time.perf_counter() - start
    rss = _rss_kib() - rss_before
    names = list(model.devices)
    rng = random.Random(1)
    singles = [(rng.choice(names), rng.randrange(VECTORS)) for _ in range(200)]
    burst = [(f"a0d{i % DEVICES_PER_ADAPTER}", (i // 8) % VECTORS) for i in range(1000)]
    # Interleaved rounds, the best counts: a shared machine's noise stays out.
    single_us = burst_us = float("inf")
    deadline = time.perf_counter() + 2 * seconds
    while time.perf_counter() < deadline:
        # Summaries stay set between rounds: after the first round no single
        # notification raises an interrupt, whatever the number of adapters.
        start = time.perf_counter()
        for name, vector in singles:
            await engine.notify(name, vector)
        single_us = min(single_us, (time.perf_counter() - start) / len(singles) * 1e6)
        for _ in range(5):
            backend.memory.write(DSCI, bytes(DEVICES_PER_ADAPTER))
            backend.memory.write(SUMMARY, b"\0")
            start = time.perf_counter()
            await engine.notify_many(burst)
            burst_us = min(burst_us, (time.perf_counter() - start) / len(burst) * 1e6)
    return {"adapters": adapters, "devices": len(names), "startup_s": startup,
            "rss_kib": rss, "single_us": single_us, "burst_us": burst_us}  # fmt: skip


async def _contention(seconds: float) -> dict[str, Any]:
    from indicators.adapters import build_model
    from indicators.config import parse_config
    from indicators.engine import Engine
    from indicators.memop import EmulatedBackend
    from indicators.simguest import SimulatedGuest
    from indicators.sinks import QueueSink

    model = build_model(parse_config(scale_config(8)))
    backend = EmulatedBackend(MEMORY)
    engine = Engine(model, backend, QueueSink())
    guest = SimulatedGuest(backend.memory, model)
    names = list(model.devices)
    rng = random.Random(2)
    guest.start()
    done, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        batch = [(rng.choice(names), rng.randrange(VECTORS)) for _ in range(100)]
        await engine.notify_many(batch)
        done += len(batch)
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    guest.stop()
    stats = engine.stats
    # The guest thread spins for the GIL: wall-clock throughput mostly says how
    # the interpreter shared it; this thread's CPU time is the engine's cost.
    return {"case": "contention", "per_second": done / elapsed, "per_cpu_second": done / cpu,
            "no_xchg_per_notify": stats.no_xchg / done,
            "cmpxchg_per_notify": stats.cmpxchg / done, "guest_cleared": guest.total}  # fmt: skip


def run_one(adapters: int, seconds: float) -> dict[str, Any]:
    """Measure one configuration in a fresh interpreter (honest RSS and start-up)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(adapters), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(asyncio.run(_measure(args.one, args.seconds))))
        return
    # Three interleaved passes over the configurations, the best of each counts:
    # a burst of noise on a shared machine then hits one pass, not one size.
    passes = [[run_one(n, args.seconds) for n in (1, 100, 1000)] for _ in range(3)]
    rows = []
    for runs in zip(*passes, strict=True):
        best = dict(runs[0])
        for key in ("startup_s", "rss_kib", "single_us", "burst_us"):
            best[key] = min(run[key] for run in runs)
        rows.append(best)
    base = rows[0]
    print(f"{'adapters':>8} {'devices':>7} {'start-up ms':>11} {'RSS KiB':>8} "
          f"{'single us':>9} {'x 1':>5} {'burst us':>8} {'x 1':>5}")  # fmt: skip
    for row in rows:
        row["single_ratio"] = row["single_us"] / base["single_us"]
        row["burst_ratio"] = row["burst_us"] / base["burst_us"]
        print(f"{row['adapters']:>8} {row['devices']:>7} {row['startup_s'] * 1e3:>11.1f} "
              f"{row['rss_kib']:>8} {row['single_us']:>9.1f} {row['single_ratio']:>5.2f} "
              f"{row['burst_us']:>8.3f} {row['burst_ratio']:>5.2f}")  # fmt: skip
    # The guest thread and the engine share the GIL: one run swings by 2-3x,
    # so three runs and the median one counts.
    runs = sorted(
        (asyncio.run(_contention(args.seconds)) for _ in range(3)),
        key=lambda r: r["per_cpu_second"],
    )
    contention = runs[1]
    print(f"contention (guest clearing): {contention['per_second']:,.0f} notify/s, "
          f"{contention['per_cpu_second']:,.0f} per CPU second of the engine's thread, "
          f"{contention['no_xchg_per_notify']:.4f} retries and "
          f"{contention['cmpxchg_per_notify']:.4f} cmpxchg per notification")  # fmt: skip
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"scale": rows, "contention": contention}, out, indent=2)


if __name__ == "__main__":
    main()
