"""Soak: the daemon against a real QEMU guest, with mixed load, faults and reconnects.

``make soak`` (``python -m indicators.testing.soak --seconds 600``) runs an
:class:`~indicators.testing.rig.IndicatorsRig` for a while in rounds.  Each
round is one QEMU lifetime:

1. load: QMP clients on the control socket and batches through the engine,
   while the guest clears concurrently; part of the time with a fault
   injector on the backend (``-EAGAIN`` on a share of the cmpxchg calls, or
   forced protection on one device's indicators);
2. settle and judge every item with a
   :class:`~indicators.testing.oracle.DeliveryOracle` over this guest's
   memory and its own counters: acknowledged, failed by code, lost;
3. kill QEMU and boot a new one: the daemon's VMM link reconnects and
   re-maps the new RAM file.

It fails (:attr:`SoakReport.problems`) when anything was lost, when a
failure code appears that no injected fault explains (protection ``4``
only in protection rounds and only for the devices in the protected
window, ``EAGAIN`` only in -EAGAIN rounds and for at most
:data:`EAGAIN_FAILURE_SHARE` of the items), when file descriptors leak, or
when live memory grows by more than :data:`HEAP_BYTES_PER_REQUEST` bytes
or :data:`BLOCKS_PER_REQUEST` objects per request after the warm-up (a
10 KiB-per-request leak is 10 times the first).  Live memory is what the C
allocator has handed out (``mallinfo2``) and the interpreter's count of
allocated blocks, after a collection: unlike RSS, neither keeps the
high-water mark that a flood of failures leaves in the allocator's arenas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..memop import EmulatedBackend, FaultInjector
from .delivery import error_code
from .oracle import DeliveryOracle, Verdict
from .rig import DEFAULT_DEVICES, IndicatorsRig

__all__ = [
    "BLOCKS_PER_REQUEST",
    "EAGAIN_FAILURE_SHARE",
    "HEAP_BYTES_PER_REQUEST",
    "SoakReport",
    "run_soak",
]

#: Live heap growth allowed per request (a notify command or an engine batch)
#: after the warm-up: the allocator's noise over thousands of requests, and
#: a tenth of a 10 KiB-per-request leak.
HEAP_BYTES_PER_REQUEST = 1024
#: Live objects (interpreter blocks) allowed per request after the warm-up.
#: A round keeps about a thousand objects whatever its length (measured: 0.1
#: per request at 12,000 requests a round); a request that kept one object
#: or more would show.
BLOCKS_PER_REQUEST = 1.0
#: -EAGAIN rounds inject it on 30 % of the cmpxchg calls; a notify fails only
#: after 32 in a row, so failures must stay rare.
EAGAIN_FAILURE_SHARE = 0.01
#: blk0's indicator byte is protected in protection rounds; net0's bits share
#: its 16-byte window, so a coalesced cmpxchg fails for both.
PROTECTED_WINDOW = frozenset({"net0", "blk0"})


@dataclass
class SoakReport:
    """What a soak found."""

    seconds: float = 0.0
    rounds: int = 0
    requests: int = 0  # notify commands and engine batches
    acknowledged: int = 0
    seen_in_memory: int = 0
    seen_by_counter: int = 0
    unverifiable: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    #: failures no injected fault explains, by code (and where)
    unexpected: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    rss_start_kib: int = 0
    rss_mid_kib: int = 0
    rss_end_kib: int = 0
    #: Over the rounds after the warm-up, each from its start to its end (a QEMU
    #: restart between rounds is not a request): live heap bytes gained
    #: (mallinfo2), interpreter blocks gained, requests made.
    heap_growth: int = 0
    blocks_growth: int = 0
    measured_requests: int = 0
    requests_at_start: int = 0
    fds_start: int = 0
    fds_end: int = 0

    @property
    def restarts(self) -> int:
        """QEMU restarts (the daemon re-attached each time)."""
        return max(0, self.rounds - 1)

    @property
    def rss_bytes_per_request(self) -> float:
        """RSS growth after the warm-up per request made since (reported only)."""
        requests = self.requests - self.requests_at_start
        return self.rss_growth_kib * 1024 / requests if requests > 0 else 0.0

    @property
    def heap_bytes_per_request(self) -> float:
        """Live heap gained per request in the measured rounds."""
        return self.heap_growth / self.measured_requests if self.measured_requests else 0.0

    @property
    def blocks_per_request(self) -> float:
        """Live interpreter blocks gained per request in the measured rounds."""
        return self.blocks_growth / self.measured_requests if self.measured_requests else 0.0

    def problems(self) -> list[str]:
        """Why the soak failed; empty when it passed."""
        out = []
        if self.lost:
            out.append(f"{self.lost} acknowledged notifications never reached the guest")
        if self.unexpected:
            out.append(f"failures no injected fault explains: {dict(self.unexpected)}")
        if self.fds_end > self.fds_start:
            out.append(f"file descriptors leaked: {self.fds_start} -> {self.fds_end}")
        if self.heap_bytes_per_request > HEAP_BYTES_PER_REQUEST:
            out.append(
                f"live memory grew {self.heap_bytes_per_request:.0f} bytes per request "
                f"(bound {HEAP_BYTES_PER_REQUEST})"
            )
        if self.blocks_per_request > BLOCKS_PER_REQUEST:
            out.append(
                f"live objects grew {self.blocks_per_request:.2f} per request "
                f"(bound {BLOCKS_PER_REQUEST})"
            )
        if not self.acknowledged:
            out.append("nothing was acknowledged")
        return out

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
            f"soak: {self.seconds:.0f} s, {self.rounds} QEMU lifetimes ({self.restarts} "
            f"restarts, the daemon re-attached each time), {self.requests:,} requests",
            f"  acknowledged notifications: {self.acknowledged:,} (bit seen at "
            f"acknowledgement {self.seen_in_memory:,}, guest counter moved "
            f"{self.seen_by_counter:,}, after the guest was killed {self.unverifiable:,})",
            f"  lost notifications: {self.lost}",
            *(f"    {example}" for example in self.lost_examples),
            f"  failed (not acknowledged) by code: {dict(self.failures) or 'none'}",
            f"  of which unexpected: {dict(self.unexpected) or 'none'}",
            f"  faults injected: {dict(self.faults) or 'none'}",
            f"  live memory over the {self.measured_requests:,} requests after the warm-up: "
            f"heap {self.heap_growth / 1024:+,.0f} KiB ({self.heap_bytes_per_request:.0f} "
            f"bytes per request), objects {self.blocks_growth:+,} "
            f"({self.blocks_per_request:.3f} per request)",
            f"  RSS: {self.rss_start_kib} KiB after warm-up -> {self.rss_mid_kib} KiB at half "
            f"time -> {self.rss_end_kib} KiB ({self.rss_growth_kib:+d} KiB; second half "
            f"{self.rss_late_growth_kib:+d} KiB; includes the allocator's high-water mark)",
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _live() -> tuple[int, int]:
    """``(heap bytes in use, interpreter blocks)`` after a collection.

    The heap is glibc's ``mallinfo2``: in-use chunks plus mmapped ones (what
    was handed out, not what the arenas keep); 0 where it is missing.
    """
    gc.collect()
    heap = 0
    with contextlib.suppress(OSError, AttributeError):
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        heap = int(info.uordblks + info.hblkhd)
    return heap, sys.getallocatedblocks()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


#: How long an fd above the start's count may take to go: one the daemon holds
#: for a moment (a storage-key dump being read in its thread, a reconnect in
#: progress) is not a leak; a leaked one stays.
FD_SETTLE_SECONDS = 5.0


async def _settled_fds(start: int) -> int:
    """The open fds, given transient ones up to :data:`FD_SETTLE_SECONDS` to close."""
    deadline = time.monotonic() + FD_SETTLE_SECONDS
    count = _fds()
    while count > start and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        count = _fds()
    return count


async def _client_load(
    rig: IndicatorsRig, until: float, report: SoakReport, oracle: DeliveryOracle, seed: int
) -> None:
    rng = random.Random(seed)
    devices = [(d["name"], _vectors(d)) for d in DEFAULT_DEVICES]
    client = QMPClient(f"soak{seed}")
    await client.connect(rig.control_socket)
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            name, count = rng.choice(devices)
            # Distinct vectors: the daemon counts a repeated vector once.
            vectors = rng.sample(range(count), rng.randint(1, min(16, count)))
            tokens = oracle.submit_many((name, vector) for vector in vectors)
            report.requests += 1
            try:
                reply: Any = await client.execute("notify", {"device": name, "vector": vectors})
            except ExecuteError as exc:
                code = f"{error_code(exc)}@{name}"
                for token in tokens:
                    oracle.failed(token, code)
            except QMPError as exc:
                for token in tokens:
                    oracle.failed(token, f"socket {type(exc).__name__}@{name}")
            else:
                if reply != {"applied": len(vectors)}:
                    report.unexpected[f"reply {reply!r}"] += 1
                for token in tokens:
                    oracle.acknowledged(token)
            client.events.clear()  # qemu.qmp keeps every event otherwise
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def _engine_load(
    rig: IndicatorsRig, until: float, report: SoakReport, oracle: DeliveryOracle, seed: int
) -> None:
    rng = random.Random(seed)
    devices = [(d["name"], _vectors(d)) for d in DEFAULT_DEVICES]
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        batch = []
        for _ in range(64):
            name, count = rng.choice(devices)
            batch.append((name, rng.randrange(count)))
        tokens = oracle.submit_many(batch)
        report.requests += 1
        errors = await rig.engine.notify_many(batch)
        for token, (name, _), error in zip(tokens, batch, errors, strict=True):
            if error is None:
                oracle.acknowledged(token)
            else:
                oracle.failed(token, f"{error.code}@{name}")
        await asyncio.sleep(0)


def _vectors(device: dict[str, Any]) -> int:
    return int(device.get("vectors") or device.get("noi") or 1)


def _allowed(round_number: int) -> tuple[str, float]:
    """The failure code this round's injected fault explains, and the share of items
    it may fail (a protected window fails all its items)."""
    return {0: ("EAGAIN", EAGAIN_FAILURE_SHARE), 1: ("4", 1.0)}.get(round_number % 3, ("", 0.0))


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
    oracle = rig.oracle()  # this QEMU's memory and counters
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(
        *(_client_load(rig, until, report, oracle, seed) for seed in range(2)),
        *(_engine_load(rig, until, report, oracle, 100 + seed) for seed in range(2)),
    )
    if faults is not None:
        report.faults.update({name: n for name, n in faults.injected.items() if n})
        wiring = rig.service.wiring
        if wiring is not None and isinstance(wiring.backend, EmulatedBackend):
            wiring.backend.faults = None
    await rig.settle()
    verdict = oracle.verdict()
    _judge(report, verdict, report.rounds)
    report.rounds += 1


def _judge(report: SoakReport, verdict: Verdict, round_number: int) -> None:
    """Add one round's verdict to ``report``; failures no fault explains are unexpected."""
    report.acknowledged += verdict.acknowledged
    report.seen_in_memory += verdict.seen_in_memory
    report.seen_by_counter += verdict.seen_by_counter
    report.unverifiable += verdict.unverifiable
    report.lost += len(verdict.lost) + len(verdict.unsettled)
    for item in (verdict.lost + verdict.unsettled)[: 5 - len(report.lost_examples)]:
        report.lost_examples.append(f"round {round_number}: {item.device} vector {item.vector}")
    code, share = _allowed(round_number)
    allowed_items = 0
    for failure, n in verdict.failed.items():
        failed_code, _, device = failure.partition("@")
        report.failures[failed_code] += n
        explained = failed_code == code and (code != "4" or device in PROTECTED_WINDOW)
        if explained:
            allowed_items += n
        else:
            report.unexpected[f"{failure} (round {round_number})"] += n
    if allowed_items > share * verdict.submitted:
        report.unexpected[f"{code} beyond {share:.0%} of the items (round {round_number})"] += (
            allowed_items
        )


async def run_soak(seconds: float, round_seconds: float = 10.0) -> SoakReport:
    """Soak for about ``seconds``; see the module docstring."""
    report = SoakReport()
    start = time.monotonic()
    # Memory is measured from the end of a warm-up round (allocator arenas,
    # caches and the first mappings settle in the first rounds).
    # The first two rounds are an -EAGAIN storm and a protection round, whose
    # floods of failures leave the allocator's high-water mark behind.
    warm_up = 2 if seconds >= 3 * round_seconds else 1
    async with IndicatorsRig(DEFAULT_DEVICES) as rig:
        while True:
            heap, blocks = _live()
            requests = report.requests
            await _round(rig, min(round_seconds, seconds), report)
            if report.rounds > warm_up:
                heap_after, blocks_after = _live()
                report.heap_growth += heap_after - heap
                report.blocks_growth += blocks_after - blocks
                report.measured_requests += report.requests - requests
            if report.rounds == warm_up:
                report.rss_start_kib, report.fds_start = _rss_kib(), _fds()
                report.requests_at_start = report.requests
            elif not report.rss_mid_kib and time.monotonic() - start >= seconds / 2:
                report.rss_mid_kib = _rss_kib()
            if time.monotonic() - start + round_seconds > seconds:
                break
            await rig.kill_qemu()
            await rig.start_qemu()
        report.rss_end_kib, report.fds_end = _rss_kib(), await _settled_fds(report.fds_start)
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
    problems = report.problems()
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
