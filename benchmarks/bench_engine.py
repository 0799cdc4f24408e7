"""Engine throughput against QEMU's per-notification algorithm, in one run.

The baseline is a Python port of what QEMU does for each notification
(hw/s390x/virtio-ccw.c, virtio_set_ind_atomic): a 1-byte cmpxchg OR loop on
the dsci byte, another on the summary byte, an interrupt when the summary
byte was 0, all on the same EmulatedBackend.  The engine is measured for
single notifications (awaited one by one) and for bursts across 64 devices
x 8 vectors.  Guest memory is zeroed before every burst (the guest consumed
everything), in the baseline's loop as well.

    .venv/bin/python benchmarks/bench_engine.py [--repeat 7] [--json FILE]

Cases are measured in interleaved rounds and the median round counts, so
a busy spell of the shared machine hits every case alike.  The C floor runs
the same algorithm with gcc -O2 on the same RAM file.

The latency of one awaited ``Engine.notify`` on an idle engine (device
dev0 vector 0, dsci and summary cleared before each, so every call is a
0 -> 1 edge with an interrupt) is measured against its floor: the two bare
``EmulatedBackend.cmpxchg`` calls it needs at least (dsci byte, summary
byte) plus one awaited done future, in interleaved rounds of 2,000 calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from indicators.adapters import AdapterModel, build_model
from indicators.config import parse_config
from indicators.engine import Engine
from indicators.memop import EmulatedBackend
from indicators.sinks import CountingSink

MEMORY = 1 << 20
DEVICES, VECTORS = 64, 8
SUMMARY, DSCI = 0x1000, 0x2000


def config(devices: int = DEVICES, vectors: int = VECTORS) -> dict[str, Any]:
    """64 virtio-ccw devices of 8 vectors, one summary byte per 8 devices."""
    return {
        "backend": {"kind": "emulated", "memory_size": MEMORY},
        "devices": [
            {
                "name": f"dev{i}",
                "kind": "virtio-ccw",
                "summary_indicator": SUMMARY + i // 8,
                "device_indicator": DSCI + i * ((vectors + 7) // 8),
                "vectors": vectors,
                "isc": 3,
            }
            for i in range(devices)
        ],
    }


def qemu_or(backend: EmulatedBackend, gaddr: int, mask: int) -> int:
    """QEMU's virtio_set_ind_atomic through the cmpxchg: returns the old byte.

    QEMU starts from a plain load of the byte; so does this port.
    """
    old = backend.memory.load(gaddr, 1)
    while True:
        result = backend.cmpxchg(gaddr, 1, old, old | mask)
        if result.exchanged:
            return old
        old = result.old


def baseline(model: AdapterModel, backend: EmulatedBackend, burst: list[tuple[str, int]],
             rounds: int) -> tuple[float, float]:  # fmt: skip
    """QEMU's algorithm, one notification at a time: (seconds per round, cmpxchg per notify)."""
    sink = CountingSink()
    calls = 0
    start = time.perf_counter()
    for _ in range(rounds):
        backend.memory.write(SUMMARY, bytes(DSCI - SUMMARY + DEVICES * 2))
        for name, vector in burst:
            device = model.devices[name]
            bit = device.dsci[vector]
            qemu_or(backend, bit.gaddr, bit.mask)
            if qemu_or(backend, device.summary.gaddr, device.summary.mask) == 0:
                sink.inject(device.adapter)
            calls += 2
    return (time.perf_counter() - start) / rounds, calls / (rounds * len(burst))


async def engine_run(engine: Engine, backend: EmulatedBackend, burst: list[tuple[str, int]],
                     rounds: int, single: bool) -> tuple[float, float]:  # fmt: skip
    """The engine: bursts through notify_many, or one awaited notify at a time."""
    calls = engine.stats.cmpxchg
    start = time.perf_counter()
    for _ in range(rounds):
        backend.memory.write(SUMMARY, bytes(DSCI - SUMMARY + DEVICES * 2))
        if single:
            for name, vector in burst:
                await engine.notify(name, vector)
        else:
            await engine.notify_many(burst)
    elapsed = time.perf_counter() - start
    return elapsed / rounds, (engine.stats.cmpxchg - calls) / (rounds * len(burst))


def bursts(size: int) -> list[tuple[str, int]]:
    """``size`` notifications spread over every device and vector."""
    return [(f"dev{i % DEVICES}", (i // DEVICES) % VECTORS) for i in range(size)]


def c_floor(ram: str, seconds: float) -> float | None:
    """Notifications per second of QEMU's algorithm in C on the same RAM file (gcc)."""
    source = Path(__file__).with_name("c") / "qemu_floor.c"
    with tempfile.TemporaryDirectory() as tmp:
        binary = str(Path(tmp) / "qemu_floor")
        try:
            subprocess.run(["gcc", "-O2", "-o", binary, str(source)], check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        out = subprocess.run(
            [binary, ram, str(MEMORY), hex(SUMMARY), hex(DSCI), str(DEVICES), str(VECTORS),
             "1000", str(seconds)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return float(json.loads(out.stdout)["per_second"])


CASES = [
    ("engine: single notify", 1, True),
    *(("engine: burst", n, False) for n in (100, 1000, 10000)),
]


async def idle_round(engine: Engine, backend: EmulatedBackend, count: int) -> list[float]:
    """``count`` awaited notifies on an idle engine, each a 0 -> 1 edge with an interrupt."""
    bit, summary = engine.model.devices["dev0"].dsci[0], engine.model.devices["dev0"].summary
    write, clock, notify = backend.memory.write, time.perf_counter, engine.notify
    samples = []
    for _ in range(count):
        write(bit.gaddr, b"\0")
        write(summary.gaddr, b"\0")
        start = clock()
        await notify("dev0", 0)
        samples.append(clock() - start)
    return samples


async def floor_round(engine: Engine, backend: EmulatedBackend, count: int) -> list[float]:
    """The floor of an awaited notify: two bare cmpxchg calls and one awaited done future."""
    bit, summary = engine.model.devices["dev0"].dsci[0], engine.model.devices["dev0"].summary
    write, clock, cmpxchg = backend.memory.write, time.perf_counter, backend.cmpxchg
    loop = asyncio.get_running_loop()
    samples = []
    for _ in range(count):
        write(bit.gaddr, b"\0")
        write(summary.gaddr, b"\0")
        start = clock()
        cmpxchg(bit.gaddr, 1, 0, bit.mask)
        cmpxchg(summary.gaddr, 1, 0, summary.mask)
        done = loop.create_future()
        done.set_result(None)
        await done
        samples.append(clock() - start)
    return samples


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


async def measure(
    model: AdapterModel, backend: EmulatedBackend, repeat: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every case in ``repeat`` interleaved rounds; the median round counts.

    Returns the throughput rows and the idle-notify latency against its floor.
    """
    rounds: dict[str, list[float]] = {}
    cmpxchg_of: dict[str, float] = {}
    sizes: dict[str, int] = {}
    idle: dict[str, dict[str, list[float]]] = {"engine": {}, "floor": {}}
    engine = Engine(model, backend, CountingSink())  # the daemon's sink on this backend
    burst_1000 = bursts(1000)
    await idle_round(engine, backend, 200)  # warm up
    await floor_round(engine, backend, 200)
    for _ in range(repeat):
        for side, run in (("engine", idle_round), ("floor", floor_round)):
            samples = await run(engine, backend, 2000)
            for name, q in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
                idle[side].setdefault(name, []).append(_pct(samples, q))
        key = "baseline: QEMU algorithm"
        per_round, cmpxchg_of[key] = baseline(model, backend, burst_1000, 10)
        rounds.setdefault(key, []).append(per_round / 1000)
        sizes[key] = 1
        for name, size, single in CASES:
            burst = burst_1000 if single else bursts(size)
            count = 1 if single else max(1, 20_000 // size)
            per_round, cmpxchg = await engine_run(engine, backend, burst, count, single)
            key = f"{name} {size}"
            rounds.setdefault(key, []).append(per_round / len(burst))
            cmpxchg_of[key], sizes[key] = cmpxchg, size
    rows = [
        {"case": key.rsplit(" ", 1)[0] if key.startswith("engine") else key, "burst": sizes[key],
         "per_second": 1 / statistics.median(seconds), "cmpxchg_per_notify": cmpxchg_of[key]}
        for key, seconds in rounds.items()
    ]  # fmt: skip
    latency = {
        side: {name: statistics.median(values) for name, values in quantiles.items()}
        for side, quantiles in idle.items()
    }
    return rows, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = build_model(parse_config(config()))
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        ram = str(Path(tmp) / "ram")
        with EmulatedBackend(MEMORY, path=ram) as backend:
            rows, idle = asyncio.run(measure(model, backend, args.repeat))
        floor = c_floor(ram, 1.0)
    base = rows[0]["per_second"]
    print(f"{'case':28} {'burst':>6} {'notify/s':>12} {'cmpxchg/notify':>15} {'x baseline':>11}")
    for row in rows:
        row["ratio"] = row["per_second"] / base
        print(f"{row['case']:28} {row['burst']:>6} {row['per_second']:>12,.0f} "
              f"{row['cmpxchg_per_notify']:>15.4f} {row['ratio']:>10.1f}x")  # fmt: skip
    if floor is not None:
        rows.append({"case": "floor: QEMU algorithm in C", "burst": 1000, "per_second": floor,
                     "cmpxchg_per_notify": 2.0, "ratio": floor / base})  # fmt: skip
        print(f"{'floor: QEMU algorithm in C':28} {1000:>6} {floor:>12,.0f} {2.0:>15.4f} "
              f"{floor / base:>10.1f}x")  # fmt: skip
    ratio = idle["engine"]["p50_us"] / idle["floor"]["p50_us"]
    for side, figures in idle.items():
        print(f"idle awaited notify, {side:6}: p50 {figures['p50_us']:.1f} us, "
              f"p99 {figures['p99_us']:.1f} us, p99.9 {figures['p999_us']:.1f} us")  # fmt: skip
    print(f"idle awaited notify / floor, p50: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rows": rows, "idle_notify": idle}, out, indent=2)


if __name__ == "__main__":
    main()
