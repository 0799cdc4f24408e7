"""The indicator engine: notifications in, atomic dsci/summary ORs and interrupts out.

``await engine.notify("net0", 2)`` means "device net0 signalled vector 2".
The engine then does what QEMU and KVM do, in their order, through the memop
backend's key-checked cmpxchg:

1. OR the vector's dsci bit into guest memory;
2. OR the device's summary bit (only for notifications whose dsci bit is in
   memory, so a summary is never set for an indicator that failed);
3. if the summary went from clear to set (by the device's summary test:
   the whole byte, as QEMU; or the bit, as KVM), decide the adapter
   interrupt, apply adapter-interruption suppression for suppressible
   adapters, and deliver it through the sink.

Notifications arriving together are coalesced: bits that share a naturally
aligned 16-byte window (and an access key) are set with one cmpxchg of the
smallest size covering them, each summary window is updated once, and each
adapter gets at most one interrupt per batch.  ``notify`` returns only once
its bit is in guest memory, or raises :class:`NotifyError`.

Each OR is a retry loop: a compare failure (``R_NO_XCHG``) retries from the
value the backend found and stops without writing when the bits are already
set; ``-EAGAIN`` backs off exponentially with jitter; anything else fails the
notifications involved.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE, isc_mask
from .adapters import Adapter, AdapterModel, Bit, Device
from .config import RetryPolicy
from .memop import MemopBackend, MemopError, ProgramException, TransientError
from .sinks import InterruptSink
from .stats import EngineStats

__all__ = ["Engine", "EngineEvent", "NotifyError"]

log = logging.getLogger(__name__)

_SIZES = (1, 2, 4, 8, 16)


class NotifyError(Exception):
    """A notification that could not be applied.

    ``code`` is the program interruption code (4, 5), the errno name
    (``"EINVAL"``, ``"EAGAIN"``) or ``"NO_XCHG_LIMIT"``; ``cause`` the
    backend's error when there was one.
    """

    def __init__(
        self,
        device: str,
        vector: int,
        code: str,
        desc: str,
        *,
        gaddr: int | None = None,
        size: int | None = None,
        key: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        self.device = device
        self.vector = vector
        self.code = code
        self.desc = desc
        self.gaddr = gaddr
        self.size = size
        self.key = key
        self.cause = cause
        where = "" if gaddr is None else f" at gaddr {gaddr:#x} size {size} key {key}"
        super().__init__(f"device {device!r} vector {vector}: {desc}{where}")


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """What the engine tells its listeners: an interrupt, a suppression, a failure."""

    kind: str  # "interrupt", "suppressed" or "failed"
    adapter: Adapter
    error: NotifyError | None = None


class _Failure(Exception):
    """An OR that failed; carries what a NotifyError needs, minus the device."""

    def __init__(
        self,
        code: str,
        desc: str,
        gaddr: int,
        size: int,
        key: int | None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(desc)
        self.code, self.desc, self.gaddr, self.size, self.key = code, desc, gaddr, size, key
        self.cause = cause

    def for_item(self, device: Device, vector: int) -> NotifyError:
        return NotifyError(
            device.name,
            vector,
            self.code,
            self.desc,
            gaddr=self.gaddr,
            size=self.size,
            key=self.key,
            cause=self.cause,
        )


class _Ticket:
    """One caller's wait: resolved when all its notifications are done."""

    __slots__ = ("errors", "future", "remaining")

    def __init__(self, future: asyncio.Future[list[NotifyError | None]], count: int) -> None:
        self.future = future
        self.remaining = count
        self.errors: list[NotifyError | None] = [None] * count

    def done(self, index: int, error: NotifyError | None) -> None:
        if error is not None:
            self.errors[index] = error
        self.remaining -= 1
        if not self.remaining and not self.future.done():
            self.future.set_result(self.errors)


# (device, vector, ticket, index in the ticket)
_Item = tuple[Device, int, _Ticket, int]


class Engine:
    """Applies notifications for the devices of ``model`` through ``backend``."""

    def __init__(
        self,
        model: AdapterModel,
        backend: MemopBackend,
        sink: InterruptSink,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.sink = sink
        self.policy = policy or RetryPolicy()
        self.stats = EngineStats()
        self.simm = 0  # per-ISC masks, 0x80 >> isc
        self.nimm = 0
        self._pending: list[_Item] = []
        self._flusher: asyncio.Task[None] | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._listeners: list[Callable[[EngineEvent], None]] = []
        self._random = random.Random()
        #: When not None, counts per (device, vector) the notifications that
        #: found their bit clear and set it (the rest merged into a set bit).
        self.set_counts: Counter[tuple[str, int]] | None = None

    # ------------------------------------------------------------- public API

    async def notify(self, device: str, vector: int) -> None:
        """Apply one notification; raise :class:`NotifyError` if it failed."""
        (error,) = await self.notify_many(((device, vector),))
        if error is not None:
            raise error

    async def notify_many(self, items: Iterable[tuple[str, int]]) -> list[NotifyError | None]:
        """Apply a batch; returns one entry per item: None (applied) or its error.

        Every item is validated first: an unknown device or a vector out of
        range raises ValueError and nothing is applied.
        """
        resolved = [(self._resolve(name, vector), vector) for name, vector in items]
        if not resolved:
            return []
        ticket = _Ticket(asyncio.get_running_loop().create_future(), len(resolved))
        self.stats.notifications += len(resolved)
        self._pending.extend(
            (device, vector, ticket, index) for index, (device, vector) in enumerate(resolved)
        )
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await asyncio.shield(ticket.future)

    def subscribe(self, listener: Callable[[EngineEvent], None]) -> None:
        """Call ``listener`` for every interrupt, suppression and failure."""
        self._listeners.append(listener)

    def pause(self) -> None:
        """Hold notifications (they stay pending, unacknowledged) until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        """Apply held and new notifications again."""
        self._running.set()

    @property
    def paused(self) -> bool:
        """Whether notifications are being held."""
        return not self._running.is_set()

    @property
    def pending(self) -> int:
        """Notifications accepted but not yet applied."""
        return len(self._pending)

    async def drain(self) -> None:
        """Wait until every accepted notification has been applied or has failed."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    def set_ais_mode(self, isc: int, mode: int) -> None:
        """The guest's SIC re-arm: mode ALL (0) clears simm and nimm, SINGLE (1) sets simm."""
        mask = isc_mask(isc)
        if mode not in (KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE):
            raise ValueError(f"AIS mode {mode} is neither ALL (0) nor SINGLE (1)")
        if self.sink.handles_suppression:
            self.sink.set_ais_mode(isc, mode)
            return
        self.nimm &= ~mask
        if mode == KVM_S390_AIS_MODE_ALL:
            self.simm &= ~mask
        else:
            self.simm |= mask

    def reset_suppression(self) -> None:
        """Clear every ISC's simm and nimm, as a FLIC reset does."""
        self.simm = self.nimm = 0

    def _resolve(self, name: str, vector: int) -> Device:
        device = self.model.devices.get(name)
        if device is None:
            raise ValueError(f"unknown device {name!r}")
        if not 0 <= vector < len(device.dsci):
            raise ValueError(
                f"device {name!r} has vectors 0..{len(device.dsci) - 1}; vector {vector} is not one"
            )
        return device

    # ------------------------------------------------------------ the batches

    async def _flush(self) -> None:
        try:
            while self._pending:
                if not self._running.is_set():
                    await self._running.wait()
                    continue
                batch, self._pending = self._pending, []
                try:
                    await self._apply(batch)
                except BaseException as exc:  # never leave a caller waiting
                    for device, vector, ticket, index in batch:
                        error = NotifyError(device.name, vector, "INTERNAL", f"engine: {exc!r}")
                        ticket.done(index, error)
                    raise
        finally:
            self._flusher = None

    async def _apply(self, batch: list[_Item]) -> None:
        stats = self.stats
        # Phase 1: dsci bits, grouped by (16-byte window, key).
        groups: dict[tuple[int, int | None], tuple[list[int], list[_Item]]] = {}
        for item in batch:
            device, vector = item[0], item[1]
            bit = device.dsci[vector]
            wkey = (bit.gaddr & ~15, device.key)
            group = groups.get(wkey)
            if group is None:
                group = groups[wkey] = ([0], [])
            group[0][0] |= bit.mask << ((15 - (bit.gaddr & 15)) << 3)
            group[1].append(item)
        applied: list[_Item] = []
        for (window, key), (mask, items) in groups.items():
            failed, old = await self._or_group(window, mask[0], key, items)
            if self.set_counts is not None:
                self._count_sets(items, failed, old, window)
            if failed:
                applied.extend(item for item in items if id(item) not in failed)
            else:
                applied.extend(items)
        stats.merged += len(batch) - sum(bin(g[0][0]).count("1") for g in groups.values())
        # Phase 2: summaries of the applied notifications.
        sgroups: dict[tuple[int, int | None], tuple[list[int], dict[Bit, list[_Item]]]] = {}
        for item in applied:
            device = item[0]
            bit = device.summary
            wkey = (bit.gaddr & ~15, device.key)
            sgroup = sgroups.get(wkey)
            if sgroup is None:
                sgroup = sgroups[wkey] = ([0], {})
            sgroup[0][0] |= bit.mask << ((15 - (bit.gaddr & 15)) << 3)
            sgroup[1].setdefault(bit, []).append(item)
        due: dict[int, Adapter] = {}
        decisions = 0
        for (window, key), (smask, by_bit) in sgroups.items():
            try:
                old = await self._or_window(window, smask[0], key)
            except _Failure as failure:
                for items in by_bit.values():
                    for item in items:
                        self._finish(item, failure.for_item(item[0], item[1]))
                continue
            for bit, items in by_bit.items():
                shift = (15 - (bit.gaddr & 15)) << 3
                old_byte = (old >> shift) & 0xFF
                for item in items:
                    device = item[0]
                    was_clear = (
                        not old_byte if device.summary_test == "byte" else not old_byte & bit.mask
                    )
                    if was_clear:
                        decisions += 1
                        due[device.adapter.id] = device.adapter
                    self._finish(item, None)
        # Phase 3: at most one interrupt per adapter per batch.
        stats.interrupts_coalesced += decisions - len(due) if decisions > len(due) else 0
        for adapter in due.values():
            self._interrupt(adapter)

    def _finish(self, item: _Item, error: NotifyError | None) -> None:
        if error is None:
            self.stats.applied += 1
        else:
            self.stats.fail(error.code, item[0].adapter.id)
            context = {
                "adapter": item[0].adapter.name,
                "device": error.device,
                "vector": error.vector,
                "gaddr": error.gaddr,
                "key": error.key,
                "code": error.code,
            }
            log.warning("notify failed: %s", error, extra=context)
            self._emit(EngineEvent("failed", item[0].adapter, error))
        item[2].done(item[3], error)

    def _count_sets(self, items: list[_Item], failed: set[int], old: int, window: int) -> None:
        assert self.set_counts is not None
        for item in items:
            if id(item) in failed:
                continue
            bit = item[0].dsci[item[1]]
            image = bit.mask << ((15 - (bit.gaddr - window)) << 3)
            if not old & image:
                self.set_counts[(item[0].name, item[1])] += 1
                old |= image  # later items of the batch on the same bit merged

    async def _or_group(
        self, window: int, mask: int, key: int | None, items: list[_Item]
    ) -> tuple[set[int], int]:
        """OR one window's dsci bits; on failure, retry byte by byte to fail only the
        notifications whose own byte cannot be set.

        Returns the ids of the failed items and the window's image before the OR.
        """
        try:
            return set(), await self._or_window(window, mask, key)
        except _Failure as failure:
            if mask.bit_length() - 1 >> 3 == (mask & -mask).bit_length() - 1 >> 3:
                for item in items:
                    self._finish(item, failure.for_item(item[0], item[1]))
                return {id(item) for item in items}, 0
        failed: set[int] = set()
        old = 0
        by_byte: dict[int, list[_Item]] = {}
        for item in items:
            by_byte.setdefault(item[0].dsci[item[1]].gaddr, []).append(item)
        for gaddr, byte_items in by_byte.items():
            bits = 0
            for device, vector, _, _ in byte_items:
                bits |= device.dsci[vector].mask
            try:
                old |= await self._or_bits(gaddr, 1, bits, key) << ((15 - (gaddr - window)) << 3)
            except _Failure as failure:
                for item in byte_items:
                    self._finish(item, failure.for_item(item[0], item[1]))
                    failed.add(id(item))
        return failed, old

    async def _or_window(self, window: int, mask: int, key: int | None) -> int:
        """OR ``mask`` (a 128-bit big-endian image of the window) with one cmpxchg
        of the smallest aligned size covering its bytes; return the window's old image."""
        first = 15 - ((mask.bit_length() - 1) >> 3)
        last = 15 - (((mask & -mask).bit_length() - 1) >> 3)
        for size in _SIZES:
            if first // size == last // size:
                break
        start = first - first % size
        shift = (16 - start - size) << 3
        old = await self._or_bits(window + start, size, mask >> shift, key)
        return old << shift

    async def _or_bits(self, gaddr: int, size: int, bits: int, key: int | None) -> int:
        """The cmpxchg retry loop; returns the value found before the OR."""
        backend, stats, policy = self.backend, self.stats, self.policy
        current = 0
        rounds = transient = 0
        while current & bits != bits:
            stats.cmpxchg += 1
            try:
                result = backend.cmpxchg(gaddr, size, current, current | bits, key)
            except TransientError as exc:
                transient += 1
                stats.eagain += 1
                if transient >= policy.eagain_attempts:
                    desc = f"-EAGAIN {transient} times"
                    raise _Failure("EAGAIN", desc, gaddr, size, key, exc) from exc
                delay = min(policy.eagain_backoff_cap, policy.eagain_backoff_base * 2**transient)
                await asyncio.sleep(delay * (0.5 + self._random.random() / 2))
                continue
            except ProgramException as exc:
                raise _Failure(str(exc.code), exc.reason, gaddr, size, key, exc) from exc
            except MemopError as exc:
                raise _Failure(_errno_name(exc.errno), exc.reason, gaddr, size, key, exc) from exc
            if result.exchanged:
                return current
            stats.no_xchg += 1
            rounds += 1
            if rounds >= policy.max_no_xchg_rounds:
                desc = f"no exchange after {rounds} rounds"
                raise _Failure("NO_XCHG_LIMIT", desc, gaddr, size, key)
            current = result.old
        return current

    # ------------------------------------------------------------- interrupts

    def _interrupt(self, adapter: Adapter) -> None:
        stats = self.stats
        if adapter.suppressible and not self.sink.handles_suppression:
            mask = isc_mask(adapter.isc)
            if self.nimm & mask:
                stats.suppressed(adapter.id)
                self._emit(EngineEvent("suppressed", adapter))
                return
            if self.simm & mask:
                self.nimm |= mask
        try:
            self.sink.inject(adapter)
        except OSError as exc:
            stats.fail(_errno_name(exc.errno), adapter.id)
            log.error("injecting an interrupt for adapter %s failed: %s", adapter.name, exc)
            return
        stats.injected(adapter.id)
        self._emit(EngineEvent("interrupt", adapter))

    def _emit(self, event: EngineEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("engine listener failed")


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, str(number))
