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
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE, isc_mask
from .adapters import Adapter, AdapterModel, Device
from .bitor import BitSetter, OrFailure, errno_name, window_image
from .config import RetryPolicy
from .errors import IndicatorsError
from .memop import MemopBackend
from .sinks import InterruptSink
from .stats import EngineStats

__all__ = ["Engine", "EngineEvent", "NotifyError"]


log = logging.getLogger(__name__)


class NotifyError(IndicatorsError):
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


def _notify_error(failure: OrFailure, device: Device, vector: int) -> NotifyError:
    """The error of one notification whose OR failed."""
    return NotifyError(
        device.name,
        vector,
        failure.code,
        failure.desc,
        gaddr=failure.gaddr,
        size=failure.size,
        key=failure.key,
        cause=failure.cause,
    )


class _Ticket:
    """One caller's batch: every item is applied or failed within one flush."""

    __slots__ = ("accepted", "entries", "errors", "future")

    def __init__(
        self,
        future: asyncio.Future[list[NotifyError | None]],
        entries: list[_Target],
    ) -> None:
        self.future = future
        self.entries = entries
        self.errors: list[NotifyError | None] = [None] * len(entries)
        self.accepted = time.perf_counter()

    def fail(self, index: int, error: NotifyError) -> None:
        self.errors[index] = error

    def resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(self.errors)


# A 16-byte window and the access key a cmpxchg on it runs under.
_WindowKey = tuple[int, int | None]


class _Target:
    """One (device, vector), made once and shared by every notification of it.

    Identity-hashed, so counting a burst's notifications per target is a
    C-speed ``Counter.update``.
    """

    __slots__ = ("byte", "device", "image", "vector", "wkey")

    def __init__(self, device: Device, vector: int) -> None:
        bit = device.dsci[vector]
        window, image = window_image(bit.gaddr, bit.mask)
        self.device = device
        self.vector = vector
        self.byte = bit.gaddr
        #: The 16-byte window of the dsci bit and the key the cmpxchg runs under.
        self.wkey: _WindowKey = (window, device.key)
        #: The bit placed in the window's 128-bit big-endian image.
        self.image = image


class Engine:
    """Applies notifications for the devices of ``model`` through ``backend``."""

    def __init__(
        self,
        model: AdapterModel,
        backend: MemopBackend,
        sink: InterruptSink,
        policy: RetryPolicy | None = None,
        stats: EngineStats | None = None,
    ) -> None:
        self.model = model
        self.sink = sink
        self.policy = policy or RetryPolicy()
        self.stats = stats or EngineStats()
        #: The cmpxchg retry loops (they count into ``stats``).
        self.setter = BitSetter(backend, self.policy, self.stats)
        self.simm = 0  # per-ISC masks, 0x80 >> isc
        self.nimm = 0
        self._pending: list[_Ticket] = []
        self._flusher: asyncio.Task[None] | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._listeners: list[Callable[[EngineEvent], None]] = []
        self._unavailable: str | None = None
        # Per device name, per vector: the shared target (a dict, so that a
        # negative or too large vector is a KeyError like an unknown name).
        self._targets: dict[str, dict[int, _Target]] = {
            device.name: {vector: _Target(device, vector) for vector in range(device.vectors)}
            for device in model.devices.values()
        }
        #: When not None, counts per (device, vector) the notifications that
        #: found their bit clear and set it (the rest merged into a set bit).
        self.set_counts: Counter[tuple[str, int]] | None = None

    # ------------------------------------------------------------- public API

    @property
    def backend(self) -> MemopBackend:
        """The memop backend the ORs go through."""
        return self.setter.backend

    @backend.setter
    def backend(self, backend: MemopBackend) -> None:
        self.setter.backend = backend

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
        items = items if isinstance(items, list | tuple) else list(items)
        targets = self._targets
        try:
            entries = [targets[name][vector] for name, vector in items]
        except (KeyError, TypeError):
            for name, vector in items:
                self.check_target(name, vector)
            raise
        if not entries:
            return []
        if self._unavailable is not None:
            return [self._refusal(entry.device, entry.vector) for entry in entries]
        ticket = _Ticket(asyncio.get_running_loop().create_future(), entries)
        self.stats.notifications += len(entries)
        self._pending.append(ticket)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await ticket.future  # a cancelled caller does not stop the flush

    def check_target(self, name: str, vector: int) -> None:
        """Raise ValueError naming the problem unless ``name``/``vector`` exists."""
        device = self.model.devices.get(name)
        if device is None:
            raise ValueError(f"unknown device {name!r}")
        if not 0 <= vector < len(device.dsci):
            raise ValueError(
                f"device {name!r} has vectors 0..{len(device.dsci) - 1}; vector {vector} is not one"
            )

    def _refusal(self, device: Device, vector: int) -> NotifyError:
        error = NotifyError(device.name, vector, "UNAVAILABLE", f"guest unavailable: "
                            f"{self._unavailable}")  # fmt: skip
        self.stats.fail(error.code, device.adapter.id)
        self._emit(EngineEvent("failed", device.adapter, error))
        return error

    def set_unavailable(self, reason: str) -> None:
        """Refuse notifications (they fail with code ``UNAVAILABLE``), pending ones too."""
        self._unavailable = reason
        pending, self._pending = self._pending, []
        for ticket in pending:
            for index, entry in enumerate(ticket.entries):
                ticket.fail(index, self._refusal(entry.device, entry.vector))
            ticket.resolve()
        self._running.set()

    def set_available(self) -> None:
        """Accept notifications again after :meth:`set_unavailable`."""
        self._unavailable = None

    @property
    def unavailable(self) -> str | None:
        """Why notifications are refused, or None."""
        return self._unavailable

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
        return sum(len(ticket.entries) for ticket in self._pending)

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
                    for ticket in batch:
                        for index, entry in enumerate(ticket.entries):
                            device, vector = entry.device, entry.vector
                            error = NotifyError(device.name, vector, "INTERNAL", f"engine: {exc!r}")
                            ticket.fail(index, error)
                        ticket.resolve()
                    raise
                now = time.perf_counter()
                latency = self.stats.latency
                for ticket in batch:
                    latency.observe(now - ticket.accepted, len(ticket.entries))
                    ticket.resolve()
        finally:
            self._flusher = None

    async def _apply(self, batch: list[_Ticket]) -> None:
        stats = self.stats
        # Phase 1: dsci bits, grouped by (16-byte window, key).
        counts: Counter[_Target] = Counter()
        for ticket in batch:
            counts.update(ticket.entries)
        groups: dict[_WindowKey, list[Any]] = {}
        for target, count in counts.items():
            group = groups.get(target.wkey)
            if group is None:
                group = groups[target.wkey] = [0, []]
            group[0] |= target.image
            group[1].append((target, count))
        applied: Counter[Device] = Counter()  # devices with an applied bit -> how many
        for wkey, (mask, members) in groups.items():
            failed, old = await self._or_group(wkey, mask, batch)
            for target, count in members:
                if target.byte in failed:
                    continue
                if self.set_counts is not None and not old & target.image:
                    self.set_counts[(target.device.name, target.vector)] += 1
                stats.applied += count
                stats.merged += count - 1
                applied[target.device] += count
        # Phase 2: the summaries of the devices with an applied bit.
        sgroups: dict[_WindowKey, list[Any]] = {}
        for device, count in applied.items():
            stats.applied_to(device.adapter.id, count)
            window, image = window_image(device.summary.gaddr, device.summary.mask)
            sgroup = sgroups.get((window, device.key))
            if sgroup is None:
                sgroup = sgroups[(window, device.key)] = [0, []]
            sgroup[0] |= image
            sgroup[1].append(device)
        due: dict[int, Adapter] = {}
        decisions = 0
        for (window, key), (smask, devices) in sgroups.items():
            try:
                old = await self.setter.or_window(window, smask, key)
            except OrFailure as failure:
                self._fail_where(batch, failure, _of_devices(set(devices)))
                continue
            for device in devices:
                shift = (15 - (device.summary.gaddr & 15)) << 3
                old_byte = (old >> shift) & 0xFF
                test = old_byte if device.summary_test == "byte" else old_byte & device.summary.mask
                if not test:
                    decisions += 1
                    due[device.adapter.id] = device.adapter
        # Phase 3: at most one interrupt per adapter per batch.
        stats.interrupts_coalesced += decisions - len(due)
        for adapter in due.values():
            self._interrupt(adapter)

    def _fail_where(
        self, batch: list[_Ticket], failure: OrFailure, which: Callable[[_Target], bool]
    ) -> None:
        """Fail the not yet failed notifications of ``batch`` whose entry is ``which``."""
        for ticket in batch:
            errors = ticket.errors
            for index, entry in enumerate(ticket.entries):
                if errors[index] is None and which(entry):
                    self._fail(ticket, index, entry, failure)

    def _fail(self, ticket: _Ticket, index: int, entry: _Target, failure: OrFailure) -> None:
        device, vector = entry.device, entry.vector
        error = _notify_error(failure, device, vector)
        self.stats.fail(error.code, device.adapter.id)
        context = {
            "adapter": device.adapter.name,
            "device": error.device,
            "vector": error.vector,
            "gaddr": error.gaddr,
            "key": error.key,
            "code": error.code,
        }
        log.warning("notify failed: %s", error, extra=context)
        self._emit(EngineEvent("failed", device.adapter, error))
        ticket.fail(index, error)

    async def _or_group(
        self, wkey: _WindowKey, mask: int, batch: list[_Ticket]
    ) -> tuple[set[int], int]:
        """OR one window's dsci bits; on failure, retry byte by byte to fail only the
        notifications whose own byte cannot be set (their tickets are in ``batch``).

        Returns the gaddrs of the bytes that failed and the window's image before the OR.
        """
        window, key = wkey
        try:
            return set(), await self.setter.or_window(window, mask, key)
        except OrFailure as failure:
            first_failure = failure
        failed: set[int] = set()
        old = 0
        for offset in range(16):
            shift = (15 - offset) << 3
            bits = (mask >> shift) & 0xFF
            if not bits:
                continue
            gaddr = window + offset
            try:
                if mask == bits << shift:  # a single byte: the first failure is its own
                    raise first_failure
                old |= await self.setter.or_bits(gaddr, 1, bits, key) << shift
            except OrFailure as failure:
                failed.add(gaddr)
                self._fail_where(batch, failure, _in_byte(wkey, gaddr))
        return failed, old

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
            stats.fail(errno_name(exc.errno), adapter.id)
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


def _of_devices(devices: set[Device]) -> Callable[[_Target], bool]:
    """Entries of these devices (their summary could not be set)."""
    return lambda entry: entry.device in devices


def _in_byte(wkey: _WindowKey, gaddr: int) -> Callable[[_Target], bool]:
    """Entries whose dsci bit is in the byte at ``gaddr`` of window ``wkey``."""
    return lambda entry: entry.wkey == wkey and entry.byte == gaddr
