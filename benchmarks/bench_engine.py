"""Engine throughput against QEMU's per-notification algorithm, in one run.

The baseline is a Python port of what QEMU does for each notification
(hw/s390x/virtio-ccw.c, virtio_set_ind_atomic): a 1-byte cmpxchg OR loop on
the dsci byte, another on the summary byte, an interrupt when the summary
byte was 0, all on the same EmulatedBackend.  The engine is measured for
single notifications (awaited one by one) and for bursts across 64 devices
x 8 vectors.  Guest memory is zeroed before every burst (the guest consumed
everything), in the baseline's loop as well.

    .venv/bin/python benchmarks/bench_engine.py [--seconds 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from indicators.adapters import AdapterModel, build_model
from indicators.config import parse_config
from indicators.engine import Engine
from indicators.memop import EmulatedBackend
from indicators.sinks import QueueSink

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
             seconds: float) -> dict[str, float]:  # fmt: skip
    """QEMU's algorithm, one notification at a time."""
    sink = QueueSink()
    calls = 0
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.memory.write(SUMMARY, bytes(DSCI - SUMMARY + DEVICES * 2))
        for name, vector in burst:
            device = model.devices[name]
            bit = device.dsci[vector]
            qemu_or(backend, bit.gaddr, bit.mask)
            if qemu_or(backend, device.summary.gaddr, device.summary.mask) == 0:
                sink.inject(device.adapter)
            calls += 2
        done += len(burst)
    elapsed = time.perf_counter() - start
    return {"per_second": done / elapsed, "cmpxchg_per_notify": calls / done}


async def engine_run(model: AdapterModel, backend: EmulatedBackend,
                     burst: list[tuple[str, int]], seconds: float,
                     single: bool) -> dict[str, float]:  # fmt: skip
    """The engine: bursts through notify_many, or one awaited notify at a time."""
    engine = Engine(model, backend, QueueSink())
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.memory.write(SUMMARY, bytes(DSCI - SUMMARY + DEVICES * 2))
        if single:
            for name, vector in burst:
                await engine.notify(name, vector)
        else:
            await engine.notify_many(burst)
        done += len(burst)
    elapsed = time.perf_counter() - start
    return {"per_second": done / elapsed, "cmpxchg_per_notify": engine.stats.cmpxchg / done}


def bursts(size: int) -> list[tuple[str, int]]:
    """``size`` notifications spread over every device and vector."""
    return [(f"dev{i % DEVICES}", (i // DEVICES) % VECTORS) for i in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = build_model(parse_config(config()))
    rows: list[dict[str, Any]] = []
    with EmulatedBackend(MEMORY) as backend:
        base = baseline(model, backend, bursts(1000), args.seconds)
        rows.append({"case": "baseline: QEMU algorithm", "burst": 1, **base})
        single = asyncio.run(engine_run(model, backend, bursts(1000), args.seconds, True))
        rows.append({"case": "engine: single notify", "burst": 1, **single})
        for size in (100, 1000, 10000):
            result = asyncio.run(engine_run(model, backend, bursts(size), args.seconds, False))
            rows.append({"case": "engine: burst", "burst": size, **result})
    print(f"{'case':28} {'burst':>6} {'notify/s':>12} {'cmpxchg/notify':>15} {'x baseline':>11}")
    for row in rows:
        row["ratio"] = row["per_second"] / base["per_second"]
        print(f"{row['case']:28} {row['burst']:>6} {row['per_second']:>12,.0f} "
              f"{row['cmpxchg_per_notify']:>15.4f} {row['ratio']:>10.1f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
