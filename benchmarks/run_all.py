"""``make bench``: every path next to its floor, the ratio next to its target, JSON and a plot.

Runs, each in its own interpreter:

- bench_memop: the backend's cmpxchg against a bare libatomic call;
- bench_engine: bursts against QEMU's algorithm in Python (and in C), and
  one awaited ``Engine.notify`` on an idle engine against two bare
  cmpxchg calls plus an awaited done future;
- bench_scale: 1/100/1,000 adapters and the contention case;
- bench_latency: a real ``indicators run`` against a bare asyncio process
  (eventfd write -> bit in the RAM file) and raw ``notify`` against the
  same daemon's ``query-version``, p50/p99/p99.9;
- bench_daemon: the same daemon through qemu.qmp clients, with throughput.

Every comparison is made within one run, in interleaved rounds, and the
medians over the rounds are quoted.  Scale and contention are measured
now and with the package as it was before issue 13 (``reference.py``),
alternately in the same run; ``results/before-issue13.json`` (every path,
this harness, 2026-12-01 before the changes) and the older
``results/recorded-2026-11-29.json`` are printed for the record.
Writes ``results/*.json``, ``results/machine.txt``, ``results/summary.md``
(the verdict table as Markdown) and ``results/bench.png`` and prints the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference import scale_now_and_before

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: make bench before issue 13's changes, same harness, same machine, same day.
BEFORE = RESULTS / "before-issue13.json"
#: The figures committed on 2026-11-29 (older harness, a busier machine).
RECORDED = RESULTS / "recorded-2026-11-29.json"
#: Run-to-run noise on this shared machine: "no worse" allows this much.
NOISE = 0.10


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
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ])  # fmt: skip


@dataclass
class Ratio:
    """One line of the verdict table: a figure, what it is measured against, the target."""

    path: str
    measured: float
    against: float
    unit: str
    target: float
    higher_is_better: bool = False  # True: ratio >= target; False: ratio <= target
    kind: str = "floor"  # what ``against`` is: "floor" or "recorded"

    @property
    def ratio(self) -> float:
        """measured / against."""
        return self.measured / self.against

    @property
    def met(self) -> bool:
        """Whether the target holds."""
        if self.higher_is_better:
            return self.ratio >= self.target
        return self.ratio <= self.target

    def texts(self) -> tuple[str, str, str]:
        """Measured, against and ratio as shown (an absolute figure has no ratio)."""
        if self.kind == "-":
            return _show(self.measured, self.unit), "-", _show(self.measured, self.unit)
        measured, against = _show(self.measured, self.unit), _show(self.against, self.unit)
        return measured, against, f"{self.ratio:.2f}x"

    def line(self) -> str:
        """The printed row."""
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "MISSED"
        measured, against, ratio = self.texts()
        return (
            f"{self.path:46} {measured:>12} {against:>12} {self.kind:>8} "
            f"{ratio:>8} {sign} {self.target:<5g} {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        """For results.json."""
        return {"path": self.path, "measured": self.measured, "against": self.against,
                "kind": self.kind, "unit": self.unit, "ratio": self.ratio,
                "target": self.target, "higher_is_better": self.higher_is_better,
                "met": self.met}  # fmt: skip


def _show(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.1f} us" if value >= 1 else f"{value:.3f} us"
    if unit == "/s":
        return f"{value / 1e6:,.3f} M/s"
    return f"{value:.4f}"


def ratios(results: dict[str, Any]) -> list[Ratio]:
    """Every target of issue 13 as a :class:`Ratio`, in the order of the issue."""
    lat = results["latency"]
    daemon, floor = lat["eventfd"]["daemon"], lat["eventfd"]["floor"]
    sock = lat["socket"]
    idle = results["engine"]["idle_notify"]
    rows = results["engine"]["rows"]
    qemu = next(r for r in rows if r["case"] == "baseline: QEMU algorithm")
    burst = next(r for r in rows if r["case"] == "engine: burst" and r["burst"] == 1000)
    edge = "eventfd write -> bit, daemon vs bare"
    out = [
        Ratio(f"{edge}, p50", daemon["p50_us"], floor["p50_us"], "us", 2),
        Ratio(f"{edge}, p99", daemon["p99_us"], floor["p99_us"], "us", 3),
        Ratio(f"{edge}, p99.9", daemon["p999_us"], floor["p999_us"], "us", 3),
        Ratio("raw notify vs query-version, p50", sock["notify 1 vector"]["p50_us"],
              sock["query-version"]["p50_us"], "us", 1.2),
        Ratio("idle Engine.notify vs 2 cmpxchg + future, p50", idle["engine"]["p50_us"],
              idle["floor"]["p50_us"], "us", 2),
        Ratio("bursts of 1,000 vs QEMU's algorithm (Python)", burst["per_second"],
              qemu["per_second"], "/s", 25, higher_is_better=True),
        Ratio("bursts of 1,000: cmpxchg per notification", burst["cmpxchg_per_notify"], 1.0,
              "", 0.01, kind="-"),
    ]  # fmt: skip
    before = results["scale_before"]
    then, now = before["contention"], results["scale"]["contention"]
    out.append(Ratio("contention: notifications per CPU second", now["per_cpu_second"],
                     then["per_cpu_second"], "/s", 1 - NOISE, higher_is_better=True,
                     kind="before"))  # fmt: skip
    for old, new in zip(before["scale"], results["scale"]["scale"], strict=True):
        for key, label in (("single_us", "single notify"), ("burst_us", "burst, per notify")):
            out.append(Ratio(f"scale {new['adapters']:>4} adapters: {label}", new[key], old[key],
                             "us", 1 + NOISE, kind="before"))  # fmt: skip
    return out


def summary(results: dict[str, Any], table: list[Ratio]) -> list[str]:
    """The report: the verdict table, then the figures behind it."""
    head = f"{'path':44} {'measured':>12} {'against':>12} {'':>8} {'ratio':>8}  target"
    lines = [head, "-" * len(head), *(row.line() for row in table)]
    lat = results["latency"]
    lines.append("")
    for group, name in (("eventfd", "daemon"), ("eventfd", "floor"),
                        ("socket", "query-version"), ("socket", "notify 1 vector")):  # fmt: skip
        row = lat[group][name]
        lines.append(f"{group} {name:16}: {_quantiles(row)} ({row['samples']} samples)")
    own = {
        q: _show(v, "us") if isinstance(v, float) else str(v)
        for q, v in lat["eventfd"]["daemon"].get("own_view_us", {}).items()
    }
    lines.append(f"the daemon's own histogram after the eventfd rounds (query-stats, accepted "
                 f"-> applied): p50 {own.get('p50')}, p99 {own.get('p99')}")  # fmt: skip
    for side, row in results["engine"]["idle_notify"].items():
        lines.append(f"idle notify {side:11}: {_quantiles(row)}")
    memop = {row["loop"]: row for row in results["memop"]["rows"]}
    size8 = memop["EmulatedBackend.cmpxchg size 8"]["us_per_op"]
    bare = memop["bare __atomic_compare_exchange_8"]["us_per_op"]
    lines.append(f"memop cmpxchg (size 8) {size8:.2f} us vs bare libatomic {bare:.2f} us: "
                 f"{size8 / bare:.1f}x")  # fmt: skip
    contention = results["scale"]["contention"]
    lines.append(f"contention: {contention['no_xchg_per_notify']:.4f} retries/notify")
    return lines


def compared(
    results: dict[str, Any], before: dict[str, Any], recorded: dict[str, Any]
) -> list[str]:
    """Each path now against before issue 13: in this run, on 2026-12-01, on 2026-11-29."""
    lines = [
        "",
        f"{'now against before issue 13':40} {'now':>12} {'this run':>12} "
        f"{'12-01 00:45':>12} {'11-29':>12}",
    ]

    def add(name: str, unit: str, now: float, *then: float | None) -> None:
        shown = " ".join(f"{'-' if v is None else _show(v, unit):>12}" for v in then)
        lines.append(f"{name:40} {_show(now, unit):>12} {shown}")

    for group, side in (("eventfd", "daemon"), ("socket", "notify 1 vector")):
        for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            add(f"{group} {side}, {label}", "us", results["latency"][group][side][key],
                None, before["latency"][group][side][key], None)  # fmt: skip
    for key, label in (("p50_us", "p50"), ("p99_us", "p99")):
        add(f"idle Engine.notify, {label}", "us", results["engine"]["idle_notify"]["engine"][key],
            None, before["engine"]["idle_notify"]["engine"][key], None)  # fmt: skip
    now, same = results["scale"], results["scale_before"]
    add("contention, notify/s (wall)", "/s", now["contention"]["per_second"],
        same["contention"]["per_second"], before["scale"]["contention"]["per_second"],
        recorded["contention"]["per_second"])  # fmt: skip
    add("contention, notify per CPU second", "/s", now["contention"]["per_cpu_second"],
        same["contention"]["per_cpu_second"], None, None)  # fmt: skip
    rows = zip(now["scale"], same["scale"], before["scale"]["scale"], recorded["scale"],
               strict=True)  # fmt: skip
    for new, this_run, earlier, oldest in rows:
        add(f"scale {new['adapters']:>4} adapters, single notify", "us", new["single_us"],
            this_run["single_us"], earlier["single_us"], oldest["single_us"])  # fmt: skip
    return lines


def markdown(results: dict[str, Any], table: list[Ratio]) -> str:
    """The verdict table and the latency figures as Markdown (for the README)."""
    lines = ["| path | measured | against | ratio | target | |", "|---|---|---|---|---|---|"]
    for row in table:
        sign = ">=" if row.higher_is_better else "<="
        measured, against, ratio = row.texts()
        against = against if row.kind == "-" else f"{against} ({row.kind})"
        lines.append(f"| {row.path} | {measured} | {against} | {ratio} | {sign} {row.target:g} | "
                     f"{'met' if row.met else '**missed**'} |")  # fmt: skip
    lines += ["", "| latency | p50 | p99 | p99.9 |", "|---|---|---|---|"]
    lat = results["latency"]
    named = [(f"eventfd -> bit, {side}", lat["eventfd"][side]) for side in ("daemon", "floor")]
    named += [(f"raw socket, {name}", row) for name, row in lat["socket"].items()]
    named += [(f"idle Engine.notify, {side}", row)
              for side, row in results["engine"]["idle_notify"].items()]  # fmt: skip
    for name, row in named:
        lines.append(f"| {name} | {row['p50_us']:,.1f} us | {row['p99_us']:,.1f} us | "
                     f"{row['p999_us']:,.1f} us |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _quantiles(row: dict[str, Any]) -> str:
    return (
        f"p50 {row['p50_us']:7.1f} us, p99 {row['p99_us']:7.1f} us, p99.9 {row['p999_us']:7.1f} us"
    )


def plot(results: dict[str, Any], table: list[Ratio], path: Path) -> None:
    """Throughput against burst size, latency distributions, ratios against targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    rows = results["engine"]["rows"]
    base = next(r for r in rows if r["case"] == "baseline: QEMU algorithm")["per_second"]
    bursts = [(r["burst"], r["per_second"]) for r in rows if r["case"] == "engine: burst"]
    single = next(r for r in rows if r["case"] == "engine: single notify")["per_second"]
    floor = next((r["per_second"] for r in rows if r["case"].startswith("floor")), None)
    left.plot([1] + [b for b, _ in bursts], [single] + [v for _, v in bursts], "o-",
              label="engine")  # fmt: skip
    left.axhline(base, color="grey", linestyle="--", label="QEMU's algorithm, Python")
    if floor:
        left.axhline(floor, color="black", linestyle=":", label="QEMU's algorithm, C")
    left.set(xscale="log", yscale="log", xlabel="notifications per burst",
             ylabel="notifications per second", title="Throughput against burst size")  # fmt: skip
    left.legend(fontsize=7)
    lat = results["latency"]
    for label, row, style in (
        ("eventfd -> bit: daemon", lat["eventfd"]["daemon"], "-"),
        ("eventfd -> bit: bare asyncio floor", lat["eventfd"]["floor"], "--"),
        ("raw socket: notify", lat["socket"]["notify 1 vector"], "-"),
        ("raw socket: query-version (no-op)", lat["socket"]["query-version"], "--"),
    ):
        points = row["percentiles_us"]
        middle.plot([us for _, us in points], [q for q, _ in points], style, label=label)
    middle.set(xscale="log", xlabel="microseconds", ylabel="fraction of notifications",
               title="Latency distribution, daemon and floors")  # fmt: skip
    middle.legend(fontsize=7)
    shown = [row for row in table if row.kind == "floor"]
    names = [row.path.replace(", daemon vs bare", "").replace(" vs ", "\nvs ") for row in shown]
    values = [row.ratio if not row.higher_is_better else 1 / row.ratio for row in shown]
    targets = [row.target if not row.higher_is_better else 1 / row.target for row in shown]
    colours = ["tab:green" if row.met else "tab:red" for row in shown]
    positions = range(len(shown))
    right.barh(positions, values, color=colours)
    right.scatter(targets, positions, marker="|", s=400, color="black", label="target", zorder=3)
    right.set_yticks(list(positions), names, fontsize=6)
    right.invert_yaxis()
    right.set(xscale="log", xlabel="x floor (bursts: floor / engine)",
              title="Cost over the floor, against the target")  # fmt: skip
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    quick = args.quick
    results = {
        "memop": run("bench_memop.py", "--repeat", "5" if quick else "20"),
        "engine": run("bench_engine.py", "--repeat", "3" if quick else "9"),
        "latency": run(
            "bench_latency.py",
            "--rounds",
            "3" if quick else "9",
            "--samples",
            "1000" if quick else "5000",
        ),
        "daemon": run("bench_daemon.py", "--seconds", "0.3" if quick else "1.0"),
    }
    before = json.loads(BEFORE.read_text())
    seconds = "0.3" if quick else "0.5"
    both = scale_now_and_before(seconds, 1 if quick else 2, RESULTS / "bench_scale.json")
    if both is None:  # no git history (an sdist): the figures recorded before issue 13
        results["scale"] = run("bench_scale.py", "--seconds", seconds)
        results["scale_before"] = {**before["scale"], "reference": "before-issue13.json"}
    else:
        results["scale"], results["scale_before"] = both["now"], both["before"]
        results["scale_before"]["reference"] = both["reference"]
    table = ratios(results)
    results["ratios"] = [row.as_dict() for row in table]
    (RESULTS / "machine.txt").write_text(machine() + "\n")
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(markdown(results, table))
    plot(results, table, RESULTS / "bench.png")
    print("\n== summary (benchmarks/results/)")
    print(machine())
    print("\n".join(summary(results, table)))
    print("\n".join(compared(results, before, json.loads(RECORDED.read_text()))))


if __name__ == "__main__":
    main()
