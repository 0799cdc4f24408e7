"""The reboot torture: a guest that registers like a driver reboots itself under load.

The airq guest runs in driver mode (:mod:`indicators.testing.driver`): every
boot it picks new indicator areas and publishes registration records; the
rig plays the VMM and ``device-add``\\ s them with lifetime ``guest``.  While
a socket client and an engine caller keep notifying the current boot's
devices, the guest reboots itself (``diag 308``); the daemon, owning the
reboot (``[vmm] manage_reboot``), drops the guest's devices before it resets
and continues the VM.  Judged at the end:

- stray bytes: the guest fills each previous boot's areas with a pattern at
  start-up and counts the bytes that changed before its next reboot;
- lost / extra: per ``(device, vector)`` of every boot, the daemon's
  ``set_counts`` (bits it turned from 0 to 1) against the guest's counters
  (bits it consumed while the boot ran, plus the ones the next boot found
  left over), summed over the boots a template device had.

Run: ``python -m indicators.testing.reboot --reboots 1000`` (``make soak``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from indicators.testing.delivery import error_code
from indicators.testing.driver import DriverSlots, areas_in_block_order, read_registrations
from indicators.testing.guest import RESULTS_GADDR
from indicators.testing.oracle import DeliveryOracle, Verdict
from indicators.testing.rig import DEFAULT_DEVICES, IndicatorsRig

__all__ = ["TortureReport", "main", "torture"]


@dataclass
class TortureReport:
    """The figures of one torture run."""

    reboots: int = 0
    #: previous-boot slots the guest checked (one per reboot after the first)
    checks: int = 0
    #: notification items acknowledged (socket and engine)
    notifications: int = 0
    #: refused, by source and kind: socket requests and engine batches refused whole
    #: ("unknown device": a dropped boot's name), engine items failed one by one
    #: (REMOVED: accepted, then its device was dropped before it was applied)
    refused: Counter[str] = field(default_factory=Counter)
    #: eventfd signals written (one eventfd on vector 0 of every device of every boot)
    eventfd_signals: int = 0
    #: eventfd signals the daemon took (its ``signals``; writes to the eventfds of a
    #: dropped boot, closed on the daemon's side, are never taken)
    eventfd_reads: int = 0
    #: bits the daemon set (``set_counts``) for live registrations
    set_bits: int = 0
    stray_bytes: int = 0
    leftover_bits: int = 0
    lost: int = 0
    extra: int = 0
    #: the delivery oracle, per boot: acknowledged items with no evidence of delivery
    oracle_lost: int = 0
    #: items neither acknowledged nor failed when their boot was judged
    unsettled: int = 0
    seen_in_memory: int = 0
    seen_by_counter: int = 0
    unexpected_failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No stray byte, nothing lost (by the counts and by the oracle), nothing counted
        that was not set, every item settled, no failure but the expected ones."""
        return not (
            self.stray_bytes
            or self.lost
            or self.extra
            or self.oracle_lost
            or self.unsettled
            or self.unexpected_failures
        )

    def lines(self) -> list[str]:
        """The report, one figure a line."""
        return [
            f"reboots        {self.reboots}",
            f"slots checked  {self.checks}",
            f"notifications  {self.notifications} acknowledged, "
            f"{self.eventfd_signals} eventfd signals ({self.eventfd_reads} taken by the daemon)",
            f"refused        {dict(self.refused)}",
            f"bits set       {self.set_bits}",
            f"stray bytes    {self.stray_bytes}",
            f"leftover bits  {self.leftover_bits} (counted by the next boot)",
            f"lost           {self.lost}",
            f"extra          {self.extra}",
            f"oracle         {self.oracle_lost} lost, {self.unsettled} unsettled "
            f"(bit seen at acknowledgement {self.seen_in_memory}, "
            f"guest counter moved {self.seen_by_counter})",
            f"unexpected     {dict(self.unexpected_failures)}",
            f"seconds        {self.seconds:.1f}",
        ]


#: Load tasks: socket clients and engine callers.
SOCKETS = 3
ENGINE_CALLERS = 2

_VECTORS = {str(d["name"]): int(d.get("vectors") or d.get("noi") or 1) for d in DEFAULT_DEVICES}


@dataclass
class _Boot:
    """One boot's registrations as the load sees them: live names and their oracle."""

    names: dict[str, str]
    oracle: DeliveryOracle
    #: our ends of the eventfds attached to vector 0 of each device
    eventfds: list[int] = field(default_factory=list)


def _boot_oracle(rig: IndicatorsRig, names: dict[str, str]) -> DeliveryOracle:
    """A delivery oracle for this boot's devices: bits at the addresses the guest
    published, counts from the template's counters (they run on across boots)."""
    memory = rig.guest.memory
    areas = areas_in_block_order(rig.layout.layout)
    first = read_registrations(memory, 1)[0]
    delta = first.summary - areas[0].summary_gaddr  # the slot offset of this boot
    template_of = {name: template for template, name in names.items()}

    def read_bit(device: str, vector: int) -> bool:
        gaddr, mask = rig.layout.areas[template_of[device]].dsci_bit(vector)
        return bool(memory.load(gaddr + delta, 1) & mask)

    def guest_count(device: str, vector: int) -> int:
        index = rig.layout.counter[(template_of[device], vector)]
        return memory.load(RESULTS_GADDR + 8 * index, 8)

    return DeliveryOracle(read_bit, guest_count)


class _Load:
    """Notifies the current boot's devices, through the socket and the engine, and
    tells the boot's oracle every outcome; pauses while no boot is open."""

    def __init__(self, rig: IndicatorsRig, report: TortureReport, seed: int) -> None:
        self.rig = rig
        self.report = report
        self.rng = random.Random(seed)
        self.boot: _Boot | None = None
        self.open = asyncio.Event()
        self.requests = 0
        self.stopped = False
        self.progress = asyncio.Event()
        self.in_flight = 0
        self.quiet = asyncio.Event()

    def start(self, boot: _Boot) -> None:
        """Notify ``boot``'s devices from now on."""
        self.boot = boot
        self.open.set()

    async def pause(self) -> None:
        """Stop starting requests and wait until every request sent has its outcome."""
        self.boot = None
        self.open.clear()
        while self.in_flight:
            self.quiet.clear()
            await self.quiet.wait()

    def stop(self) -> None:
        """End the load tasks."""
        self.stopped = True
        self.open.set()

    async def _begin(self, n: int) -> tuple[DeliveryOracle, list[tuple[str, list[int]]]] | None:
        while self.boot is None:
            if self.stopped:
                return None
            await self.open.wait()
        if self.stopped:
            return None
        names = self.boot.names
        picks = []
        for _ in range(n):
            template = self.rng.choice(sorted(names))
            count = _VECTORS[template]
            # distinct vectors: the daemon counts a repeated vector once
            picks.append(
                (names[template], self.rng.sample(range(count), self.rng.randint(1, count)))
            )
        self.in_flight += 1
        return self.boot.oracle, picks

    def _end(self, acknowledged: int, codes: Counter[str]) -> None:
        self.report.notifications += acknowledged
        self.report.refused.update(codes)
        self.requests += 1
        self.in_flight -= 1
        self.progress.set()
        self.quiet.set()

    async def socket(self, number: int) -> None:
        client = QMPClient(f"torture-socket{number}")
        await client.connect(self.rig.control_socket)
        try:
            while (begun := await self._begin(1)) is not None:
                oracle, [(name, vectors)] = begun
                tokens = oracle.submit_many((name, v) for v in vectors)
                try:
                    await client.execute("notify", {"device": name, "vector": vectors})
                except ExecuteError as exc:
                    unknown = str(exc).startswith("unknown device")
                    code = "unknown device" if unknown else error_code(exc)
                    for token in tokens:
                        oracle.failed(token, code)
                    self._end(0, Counter({f"socket: {code}": 1}))
                else:
                    for token in tokens:
                        oracle.acknowledged(token)
                    self._end(len(vectors), Counter())
                client.events.clear()  # qemu.qmp keeps every event otherwise
        finally:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    async def eventfds(self) -> None:
        """Signal every eventfd of the open boot, round after round (no acknowledgement:
        ``set_counts`` and the guest's counters judge these)."""
        while await self._begin(0) is not None:
            boot = self.boot
            if boot is not None:
                for fd in boot.eventfds:
                    os.eventfd_write(fd, 1)
                self.report.eventfd_signals += len(boot.eventfds)
            self._end(0, Counter())
            await asyncio.sleep(0)

    async def engine(self) -> None:
        while (begun := await self._begin(4)) is not None:
            oracle, picks = begun
            batch = [(name, v) for name, vectors in picks for v in vectors]
            tokens = oracle.submit_many(batch)
            try:
                errors = await self.rig.engine.notify_many(batch)
            except ValueError as exc:  # the whole batch refused, nothing applied
                unknown = str(exc).startswith("unknown device")
                code = "unknown device" if unknown else str(exc)
                for token in tokens:
                    oracle.failed(token, code)
                self._end(0, Counter({f"engine: {code}": 1}))
            else:
                codes: Counter[str] = Counter()
                for token, error in zip(tokens, errors, strict=True):
                    if error is None:
                        oracle.acknowledged(token)
                    else:
                        oracle.failed(token, error.code)
                        codes[f"engine: {error.code}"] += 1
                self._end(errors.count(None), codes)
            await asyncio.sleep(0)


async def _attach_eventfds(admin: QMPClient, names: dict[str, str]) -> list[int]:
    """One eventfd per device on vector 0, attached as a VMM does (``getfd`` then
    ``attach-eventfd``); returns our ends."""
    fds = []
    for name in names.values():
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(fd)
        admin.send_fd_scm(fd)
        await admin.execute("getfd", {"fdname": f"ev-{name}"})
        await admin.execute("attach-eventfd", {"device": name, "vector": 0, "fdname": f"ev-{name}"})
    return fds


async def _wait_dropped(client: QMPClient, names: Iterable[str], timeout: float = 30.0) -> None:
    gone = set(names)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        reply: Any = await client.execute("query-adapters")
        listed = {str(d["name"]) for adapter in reply for d in adapter["devices"]}
        if not gone & listed:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"devices {sorted(gone & listed)} still registered")
        await asyncio.sleep(0.002)


async def torture(
    reboots: int, *, manage_reboot: bool = True, per_boot: int = 4, seed: int = 0
) -> TortureReport:
    """``reboots`` guest reboots, each after ``per_boot`` or more requests of load."""
    report = TortureReport()
    t0 = time.monotonic()
    async with IndicatorsRig(
        driver=DriverSlots(), config={"vmm": {"manage_reboot": manage_reboot}}
    ) as rig:
        set_counts: Counter[tuple[str, int]] = Counter()
        rig.engine.set_counts = set_counts
        load = _Load(rig, report, seed)
        admin = await rig.client("torture-vmm")
        tasks: list[asyncio.Task[None]] = []
        history: list[dict[str, str]] = []
        try:
            for _ in range(reboots):
                names = await rig.register(admin)
                history.append(names)
                boot = _Boot(names, _boot_oracle(rig, names), await _attach_eventfds(admin, names))
                load.start(boot)
                if not tasks:
                    # several of each: more requests in flight when the guest reboots
                    tasks = [asyncio.create_task(load.socket(i)) for i in range(SOCKETS)]
                    tasks += [asyncio.create_task(load.engine()) for _ in range(ENGINE_CALLERS)]
                    tasks.append(asyncio.create_task(load.eventfds()))
                start = load.requests
                while load.requests < start + per_boot:
                    load.progress.clear()
                    await load.progress.wait()
                await rig.reboot_guest()  # notifications keep flowing through the reboot
                await _wait_dropped(admin, names.values())
                admin.events.clear()
                # The new boot counted what this one left set and registered nothing
                # yet: this boot's counters are final once its last request is in.
                await load.pause()
                _judge(report, boot.oracle.verdict())
                for fd in boot.eventfds:  # the daemon closed its copies at the drop
                    os.close(fd)
        finally:
            load.stop()
            # a load task that died is a failure of the run, not something to hide
            await asyncio.gather(*tasks)
        # the last boot registers nothing: every old boot's leftovers are counted
        counts = await rig.park()
        stats = rig.driver_stats()
        report.eventfd_reads = rig.service.eventfds.signals
        rig.engine.set_counts = None
    expected: Counter[tuple[str, int]] = Counter()
    for names in history:
        for template, name in names.items():
            for vector in range(_VECTORS[template]):
                expected[(template, vector)] += set_counts.get((name, vector), 0)
    report.reboots = stats.boots - 1
    report.checks = stats.checks
    report.set_bits = sum(expected.values())
    report.stray_bytes = stats.stray
    report.leftover_bits = stats.leftover
    report.lost = sum((expected - counts).values())
    report.extra = sum((counts - expected).values())
    report.seconds = time.monotonic() - t0
    return report


#: Failures the torture expects: a request that names a dropped boot's device, and an
#: item accepted before its device was dropped and then failed with it.
EXPECTED_FAILURES = frozenset({"unknown device", "REMOVED"})


def _judge(report: TortureReport, verdict: Verdict) -> None:
    """Add one boot's oracle verdict to ``report``."""
    report.oracle_lost += len(verdict.lost)
    report.unsettled += len(verdict.unsettled)
    report.seen_in_memory += verdict.seen_in_memory
    report.seen_by_counter += verdict.seen_by_counter
    report.unexpected_failures.update(verdict.unexpected_failures(EXPECTED_FAILURES))


def main(argv: list[str] | None = None) -> int:
    """``python -m indicators.testing.reboot``: print the report; 1 unless all is well."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reboots", type=int, default=1000)
    parser.add_argument("--per-boot", type=int, default=4, help="requests per boot at least")
    parser.add_argument(
        "--no-manage-reboot",
        action="store_true",
        help="leave the reboot to QEMU (shows the window)",
    )
    args = parser.parse_args(argv)
    report = asyncio.run(
        torture(args.reboots, manage_reboot=not args.no_manage_reboot, per_boot=args.per_boot)
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
