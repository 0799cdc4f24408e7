"""Soak: the daemon against a real QEMU guest, with mixed load, faults and reconnects.

``make soak`` (``python -m indicators.testing.soak --seconds 600``) runs an
:class:`~indicators.testing.rig.IndicatorsRig` for a while in rounds.  Each
round is one QEMU lifetime:

1. load: QMP clients on the control socket and batches through the engine,
   while the guest clears concurrently; part of the time with a fault
   injector on the backend (``-EAGAIN`` on a share of the cmpxchg calls, or
   forced protection on one device's indicators);
2. settle, park the guest and compare its counts per (device, vector) with
   the notifications that found their bit clear: any difference is a lost
   (or invented) notification;
3. kill QEMU and boot a new one: the daemon's VMM link reconnects and
   re-maps the new RAM file.

At the end it prints lost notifications (must be 0), errors by code, the
daemon's memory growth (this process's RSS, the daemon runs in it) and open
file descriptors, and exits non-zero when anything was lost or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..memop import EmulatedBackend, FaultInjector
from .rig import DEFAULT_DEVICES, IndicatorsRig

__all__ = ["SoakReport", "run_soak"]


@dataclass
class SoakReport:
    """What a soak found."""

    seconds: float = 0.0
    rounds: int = 0
    acknowledged: int = 0
    lost: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    rss_start_kib: int = 0
    rss_mid_kib: int = 0
    rss_end_kib: int = 0
    fds_start: int = 0
    fds_end: int = 0

    @property
    def rss_growth_kib(self) -> int:
        """Resident memory growth after the warm-up round(s)."""
        return self.rss_end_kib - self.rss_start_kib

    @property
    def rss_late_growth_kib(self) -> int:
        """Growth over the second half: a leak keeps growing, a high-water mark does not."""
        return self.rss_end_kib - (self.rss_mid_kib or self.rss_start_kib)

    def lines(self) -> list[str]:
        """The report, a line per figure."""
        return [
            f"soak: {self.seconds:.0f} s, {self.rounds} QEMU lifetimes (reconnects)",
            f"  acknowledged notifications: {self.acknowledged:,}",
            f"  lost notifications: {self.lost}",
            f"  failed (not acknowledged) by code: {dict(self.failures) or 'none'}",
            f"  faults injected: {dict(self.faults) or 'none'}",
            f"  RSS: {self.rss_start_kib} KiB after warm-up -> {self.rss_mid_kib} KiB at half "
            f"time -> {self.rss_end_kib} KiB ({self.rss_growth_kib:+d} KiB; second half "
            f"{self.rss_late_growth_kib:+d} KiB)",
            f"  open fds: {self.fds_start} -> {self.fds_end}",
        ]


def _rss_kib() -> int:
    """Resident memory after a collection and ``malloc_trim``: what is live, not the
    high-water mark that freed heap pages leave behind after an event flood."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _client_load(rig: IndicatorsRig, until: float, report: SoakReport, seed: int) -> None:
    rng = random.Random(seed)
    devices = [(d["name"], _vectors(d)) for d in DEFAULT_DEVICES]
    client = QMPClient(f"soak{seed}")
    await client.connect(rig.control_socket)
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            name, count = rng.choice(devices)
            vectors = [rng.randrange(count) for _ in range(rng.randint(1, 16))]
            try:
                reply: Any = await client.execute("notify", {"device": name, "vector": vectors})
                report.acknowledged += int(reply["applied"])
            except ExecuteError:
                report.failures["socket: notify refused"] += 1
            except QMPError as exc:
                report.failures["socket: " + type(exc).__name__] += 1
            client.events.clear()  # qemu.qmp keeps every event otherwise
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def _engine_load(rig: IndicatorsRig, until: float, report: SoakReport, seed: int) -> None:
    rng = random.Random(seed)
    devices = [(d["name"], _vectors(d)) for d in DEFAULT_DEVICES]
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        batch = []
        for _ in range(64):
            name, count = rng.choice(devices)
            batch.append((name, rng.randrange(count)))
        errors = await rig.engine.notify_many(batch)
        report.acknowledged += sum(error is None for error in errors)
        for error in errors:
            if error is not None:
                report.failures[error.code] += 1
        await asyncio.sleep(0)


def _vectors(device: dict[str, Any]) -> int:
    return int(device.get("vectors") or device.get("noi") or 1)


def _inject(rig: IndicatorsRig, round_number: int) -> FaultInjector | None:
    """Rounds cycle through an EAGAIN storm, protection on blk0's indicators, no fault."""
    wiring = rig.service.wiring
    backend = wiring.backend if wiring else None
    if not isinstance(backend, EmulatedBackend) or round_number % 3 == 2:
        return None
    if round_number % 3 == 0:
        faults = FaultInjector(eagain_probability=0.3, eagain_sizes=frozenset({1, 2, 4, 8, 16}))
    else:
        faults = FaultInjector()
        blk0 = next(d for d in DEFAULT_DEVICES if d["name"] == "blk0")
        faults.protect(int(blk0["device_indicator"]), 1)
    backend.faults = faults
    return faults


async def _round(rig: IndicatorsRig, seconds: float, report: SoakReport) -> None:
    faults = _inject(rig, report.rounds)
    before = Counter(rig.engine.set_counts or {})
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(
        *(_client_load(rig, until, report, seed) for seed in range(2)),
        *(_engine_load(rig, until, report, 100 + seed) for seed in range(2)),
    )
    if faults is not None:
        report.faults.update({name: n for name, n in faults.injected.items() if n})
        wiring = rig.service.wiring
        if wiring is not None and isinstance(wiring.backend, EmulatedBackend):
            wiring.backend.faults = None
    await rig.settle()
    counts = await rig.park()
    expected = Counter(rig.engine.set_counts or {}) - before
    report.lost += sum(((expected - counts) + (counts - expected)).values())
    report.rounds += 1


async def run_soak(seconds: float, round_seconds: float = 10.0) -> SoakReport:
    """Soak for about ``seconds``; see the module docstring."""
    report = SoakReport()
    start = time.monotonic()
    # Memory is measured from the end of a warm-up round (allocator arenas,
    # caches and the first mappings settle in the first rounds).
    warm_up = 2 if seconds >= 4 * round_seconds else 1
    async with IndicatorsRig(DEFAULT_DEVICES) as rig:
        while True:
            await _round(rig, min(round_seconds, seconds), report)
            if report.rounds == warm_up:
                report.rss_start_kib, report.fds_start = _rss_kib(), _fds()
            elif not report.rss_mid_kib and time.monotonic() - start >= seconds / 2:
                report.rss_mid_kib = _rss_kib()
            if time.monotonic() - start + round_seconds > seconds:
                break
            await rig.kill_qemu()
            await rig.start_qemu()
        report.rss_end_kib, report.fds_end = _rss_kib(), _fds()
    report.seconds = time.monotonic() - start
    return report


def main() -> int:
    """``python -m indicators.testing.soak``."""
    parser = argparse.ArgumentParser(description="Soak the daemon against a real QEMU guest.")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--round-seconds", type=float, default=10.0)
    args = parser.parse_args()
    report = asyncio.run(run_soak(args.seconds, args.round_seconds))
    print("\n".join(report.lines()))
    leaked = report.fds_end > report.fds_start or report.rss_late_growth_kib > 32 * 1024
    return 1 if report.lost or leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
