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
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from indicators.testing.delivery import error_code
from indicators.testing.driver import DriverSlots
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
    #: bits the daemon set (``set_counts``) for live registrations
    set_bits: int = 0
    stray_bytes: int = 0
    leftover_bits: int = 0
    lost: int = 0
    extra: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No stray byte, nothing lost, nothing counted that was not set."""
        return self.stray_bytes == 0 and self.lost == 0 and self.extra == 0

    def lines(self) -> list[str]:
        """The report, one figure a line."""
        return [
            f"reboots        {self.reboots}",
            f"slots checked  {self.checks}",
            f"notifications  {self.notifications} acknowledged",
            f"refused        {dict(self.refused)}",
            f"bits set       {self.set_bits}",
            f"stray bytes    {self.stray_bytes}",
            f"leftover bits  {self.leftover_bits} (counted by the next boot)",
            f"lost           {self.lost}",
            f"extra          {self.extra}",
            f"seconds        {self.seconds:.1f}",
        ]


_VECTORS = {str(d["name"]): int(d.get("vectors") or d.get("noi") or 1) for d in DEFAULT_DEVICES}


class _Load:
    """Notifies the current boot's devices until stopped; counts requests per boot."""

    def __init__(self, rig: IndicatorsRig, report: TortureReport, seed: int) -> None:
        self.rig = rig
        self.report = report
        self.rng = random.Random(seed)
        self.names: dict[str, str] = {}
        self.requests = 0
        self.stopped = False
        self.progress = asyncio.Event()

    def _pick(self) -> tuple[str, list[int]]:
        template = self.rng.choice(sorted(self.names))
        count = _VECTORS[template]
        # distinct vectors: the daemon counts a repeated vector once
        return self.names[template], self.rng.sample(range(count), self.rng.randint(1, count))

    def _done(self, acknowledged: int, code: str | None) -> None:
        if code is None:
            self.report.notifications += acknowledged
        else:
            self.report.refused[code] += 1
        self.requests += 1
        self.progress.set()

    async def socket(self) -> None:
        client = QMPClient("torture-socket")
        await client.connect(self.rig.control_socket)
        try:
            while not self.stopped:
                name, vectors = self._pick()
                try:
                    await client.execute("notify", {"device": name, "vector": vectors})
                except ExecuteError as exc:
                    message = str(exc)
                    unknown = message.startswith("unknown device")
                    self._done(0, "socket: " + ("unknown device" if unknown else error_code(exc)))
                else:
                    self._done(len(vectors), None)
                client.events.clear()  # qemu.qmp keeps every event otherwise
        finally:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    async def engine(self) -> None:
        while not self.stopped:
            batch = [
                (name, v) for name, vectors in (self._pick() for _ in range(4)) for v in vectors
            ]
            try:
                errors = await self.rig.engine.notify_many(batch)
            except ValueError as exc:  # the whole batch refused, nothing applied
                unknown = str(exc).startswith("unknown device")
                self._done(0, "engine: " + ("unknown device" if unknown else str(exc)))
            else:
                for error in errors:
                    self._done(1 if error is None else 0, None if error is None else error.code)
            await asyncio.sleep(0)


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
                load.names = await rig.register(admin)
                history.append(dict(load.names))
                if not tasks:
                    tasks = [asyncio.create_task(load.socket()), asyncio.create_task(load.engine())]
                start = load.requests
                while load.requests < start + per_boot:
                    load.progress.clear()
                    await load.progress.wait()
                await rig.reboot_guest()
                await _wait_dropped(admin, history[-1].values())
                admin.events.clear()
        finally:
            load.stopped = True
            # a load task that died is a failure of the run, not something to hide
            await asyncio.gather(*tasks)
        # the last boot registers nothing: every old boot's leftovers are counted
        counts = await rig.park()
        stats = rig.driver_stats()
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
