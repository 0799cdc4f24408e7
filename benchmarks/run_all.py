"""``make bench``: every benchmark, one table with ratios and targets, JSON and a plot.

Runs, each in its own interpreter, bench_memop (the backend against a bare
libatomic call), bench_engine (QEMU's algorithm in Python and in C against
the engine, single and bursts), bench_scale (1/100/1,000 adapters,
contention) and bench_daemon (socket and eventfd round trips against a
qemu.qmp no-op).  Writes ``benchmarks/results/results.json``,
``benchmarks/results/machine.txt`` and ``benchmarks/results/bench.png``
(throughput against burst size, notify latency distribution) and prints the
summary with each target's verdict.  A benchmark reports; it never fails.

    make bench            # or: .venv/bin/python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> Any:
    """Run one benchmark script with ``--json`` and return what it wrote."""
    out = RESULTS / f"{Path(script).stem}.json"
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], check=True)
    return json.loads(out.read_text())


def machine() -> str:
    """What the figures were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        qemu = subprocess.run(["qemu-system-s390x", "--version"], capture_output=True, text=True)
        qemu_version = qemu.stdout.splitlines()[0] if qemu.stdout else "absent"
    except OSError:
        qemu_version = "absent"
    return "\n".join([
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {cpu}",
        f"kernel: {platform.release()}",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"qemu: {qemu_version}",
    ])  # fmt: skip


def _row(rows: list[dict[str, Any]], key: str, value: Any) -> dict[str, Any]:
    return next(row for row in rows if row.get(key) == value)


def summary(results: dict[str, Any]) -> list[str]:
    """The report: figures, ratios and each target's verdict."""
    lines = []
    memop = {row["loop"]: row for row in results["memop"]["rows"]}
    size8 = memop["EmulatedBackend.cmpxchg size 8"]["us_per_op"]
    fastest = memop["bare __atomic_compare_exchange_8"]["us_per_op"]
    usual = memop["bare, CDLL + argtypes"]["us_per_op"]
    lines.append(f"memop cmpxchg (size 8): {size8:.2f} us; bare libatomic call {fastest:.2f} us "
                 f"(fastest ctypes form) / {usual:.2f} us (usual form): {size8 / fastest:.1f}x / "
                 f"{size8 / usual:.1f}x (target <= 2x)")  # fmt: skip
    engine = results["engine"]
    base = _row(engine, "case", "baseline: QEMU algorithm")["per_second"]
    burst = next(r for r in engine if r["case"] == "engine: burst" and r["burst"] == 1000)
    floor = next((r for r in engine if r["case"].startswith("floor")), None)
    lines.append(f"engine bursts of 1,000: {burst['per_second']:,.0f} notify/s = "
                 f"{burst['per_second'] / base:.1f}x QEMU's algorithm in Python (target >= 10x), "
                 f"{burst['cmpxchg_per_notify']:.4f} cmpxchg/notify (target <= 0.05)")  # fmt: skip
    if floor:
        lines.append(f"  C floor {floor['per_second']:,.0f} notify/s: the engine is "
                     f"{floor['per_second'] / burst['per_second']:.0f}x slower "
                     f"(target within 10x)")  # fmt: skip
    scale = results["scale"]["scale"]
    one = scale[0]
    for row in scale:
        single = row["single_us"] / one["single_us"]
        burst_ratio = row["burst_us"] / one["burst_us"]
        lines.append(
            f"scale {row['adapters']:>5} adapters ({row['devices']} devices): start-up "
            f"{row['startup_s'] * 1e3:.0f} ms, RSS +{row['rss_kib'] / 1024:.1f} MiB, "
            f"single {row['single_us']:.1f} us ({single:.2f}x), burst {row['burst_us']:.3f} "
            f"us/notify ({burst_ratio:.2f}x; target <= 1.2x)"
        )
    contention = results["scale"]["contention"]
    lines.append(f"contention (guest clearing): {contention['per_second']:,.0f} notify/s, "
                 f"{contention['no_xchg_per_notify']:.4f} retries/notify")  # fmt: skip
    for row in results["daemon"]["rows"]:
        if row.get("p50_us") is not None:
            lines.append(f"daemon {row['name']}: p50 {row['p50_us']:.0f} us, "
                         f"p99 {row['p99_us']:.0f} us")  # fmt: skip
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput against burst size, and the notify latency distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    engine = results["engine"]
    base = _row(engine, "case", "baseline: QEMU algorithm")["per_second"]
    bursts = [(r["burst"], r["per_second"]) for r in engine if r["case"] == "engine: burst"]
    single = _row(engine, "case", "engine: single notify")["per_second"]
    floor = next((r["per_second"] for r in engine if r["case"].startswith("floor")), None)
    xs = [1] + [b for b, _ in bursts]
    left.plot(xs, [single] + [v for _, v in bursts], "o-", label="engine (notify_many)")
    left.axhline(base, color="grey", linestyle="--", label="QEMU's algorithm, Python")
    if floor:
        left.axhline(floor, color="black", linestyle=":", label="QEMU's algorithm, C")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("notifications per burst")
    left.set_ylabel("notifications per second")
    left.set_title("Throughput against burst size")
    left.legend()
    for row in results["daemon"]["rows"]:
        points = row.get("percentiles_us")
        if points:
            right.plot([us for _, us in points], [q for q, _ in points], label=row["name"])
    right.set_xscale("log")
    right.set_xlabel("round trip, microseconds")
    right.set_ylabel("fraction of requests")
    right.set_title("Notify latency distribution (control socket, eventfd)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    seconds = "0.3" if args.quick else "1.0"
    results = {
        "memop": run("bench_memop.py", "--repeat", "5" if args.quick else "20"),
        "engine": run("bench_engine.py", "--repeat", "3" if args.quick else "7"),
        "scale": run("bench_scale.py", "--seconds", seconds),
        "daemon": run("bench_daemon.py", "--seconds", seconds),
    }
    (RESULTS / "machine.txt").write_text(machine() + "\n")
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "bench.png")
    print("\n== summary (benchmarks/results/)")
    print(machine())
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
