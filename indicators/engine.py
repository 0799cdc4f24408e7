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
notifications involved.  A failed notification leaves guest memory as it
found it (the summary's store is checked before any dsci bit is written,
and the bits are taken back if the summary still fails): see
:mod:`indicators.batch`, which holds the one code that decides what a batch
writes.

When the engine is idle (nothing pending, no flush running, not held,
available), a notification is applied in the caller's own callback: the
batch code runs with a batch of one and no task is made
(:meth:`Engine.notify_nowait`).  Notifications that arrive while a batch is
being applied queue and are coalesced into the next one; a batch that has to
wait (the ``-EAGAIN`` back-off) is carried on by a flush task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE
from .adapters import Adapter, AdapterModel, Device
from .batch import BatchWriter
from .bitor import BitSetter
from .config import RetryPolicy
from .memop import MemopBackend
from .notification import NotifyError, Target, Ticket
from .resumed import Resumed
from .sinks import InterruptSink
from .stats import EngineStats
from .suppression import Suppression
from .withdrawal import withdraw

__all__ = ["Engine", "EngineEvent", "NotifyError"]


log = logging.getLogger(__name__)

#: Eager batches one task may run in a row before one of its notifications is
#: queued (and the task yields to the event loop).
EAGER_STREAK = 256


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """What the engine tells its listeners: an interrupt, a suppression, a failure."""

    kind: str  # "interrupt", "suppressed" or "failed"
    adapter: Adapter
    error: NotifyError | None = None


#: What :meth:`Engine.notify_nowait` returns: the outcome, or a future of it.
Outcome = list[NotifyError | None] | asyncio.Future[list[NotifyError | None]]


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
        self.stats = stats or EngineStats()
        #: The cmpxchg retry loops (they count into ``stats``).
        self.setter = BitSetter(backend, policy or RetryPolicy(), self.stats)
        self.writer = BatchWriter(self.setter, self.stats, self._failed, self._interrupt)
        #: Adapter-interruption suppression (when the sink does not apply it itself).
        self.suppression = Suppression()
        self._pending: list[Ticket] = []
        self._applying: list[Ticket] = []  # the batch a flush is applying now
        self._flusher: asyncio.Task[None] | None = None
        self._eager = False  # a batch is being applied in a caller's callback
        self._streak_task: asyncio.Task[Any] | None = None  # the task of the last eager batch
        self._streak = 0  # its eager batches since the loop last turned for the engine
        self._running = asyncio.Event()  # clear while held: a flush waits on it
        self._running.set()
        self._held = False  # not self._running.is_set(), as a plain attribute for the hot path
        self._listeners: list[Callable[[EngineEvent], None]] = []
        self._unavailable: str | None = None
        # Per device name, per vector: the shared target (a dict, so that a
        # negative or too large vector is a KeyError like an unknown name).
        self._targets: dict[str, dict[int, Target]] = {
            device.name: Target.all_of(device) for device in model.devices.values()
        }

    # ------------------------------------------------------------- public API

    @property
    def backend(self) -> MemopBackend:
        """The memop backend the ORs go through."""
        return self.setter.backend

    @backend.setter
    def backend(self, backend: MemopBackend) -> None:
        self.setter.backend = backend

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy of the cmpxchg loops (a reload may replace it)."""
        return self.setter.policy

    @policy.setter
    def policy(self, policy: RetryPolicy) -> None:
        self.setter.policy = policy

    @property
    def set_counts(self) -> Counter[tuple[str, int]] | None:
        """When not None, counts per (device, vector) the acknowledged notifications
        that found their bit clear and set it (the rest merged into a set bit)."""
        return self.writer.set_counts

    @set_counts.setter
    def set_counts(self, counts: Counter[tuple[str, int]] | None) -> None:
        self.writer.set_counts = counts

    async def notify(self, device: str, vector: int) -> None:
        """Apply one notification; raise :class:`NotifyError` if it failed."""
        outcome = self.notify_nowait(((device, vector),))
        (error,) = outcome if isinstance(outcome, list) else await outcome
        if error is not None:
            raise error

    async def notify_many(self, items: Iterable[tuple[str, int]]) -> list[NotifyError | None]:
        """Apply a batch; returns one entry per item: None (applied) or its error.

        Every item is validated first: an unknown device or a vector out of
        range raises ValueError and nothing is applied.  On an idle engine
        the batch is applied before this coroutine first yields.
        """
        outcome = self.notify_nowait(items)
        if isinstance(outcome, list):
            return outcome
        return await outcome  # a cancelled caller does not stop the flush

    def notify_nowait(self, items: Iterable[tuple[str, int]]) -> Outcome:
        """Apply a batch now if the engine is idle, else queue it.

        Returns the per-item outcome (as :meth:`notify_many`) when the batch
        was applied in this call - the engine was idle (nothing pending, no
        flush running, not held, available) and nothing had to wait - or a
        future of it.  A task that notifies in a tight loop is queued once
        every :data:`EAGER_STREAK` batches, so that it cannot keep the event
        loop from everything else.  For sources that live in callbacks (eventfds, the
        control socket): an idle engine costs them no task and no loop pass.
        Raises ValueError as :meth:`notify_many` does.
        """
        items = items if isinstance(items, (list, tuple)) else list(items)
        targets = self._targets
        try:
            if len(items) == 1:  # no comprehension for the common single notification
                name, vector = items[0]
                entries = [targets[name][vector]]
            else:
                entries = [targets[name][vector] for name, vector in items]
        except (KeyError, TypeError):
            for name, vector in items:
                self.check_target(name, vector)
            raise
        if not entries:
            return []
        if self._unavailable is not None:
            return [self._refusal(entry.device, entry.vector) for entry in entries]
        self.stats.notifications += len(entries)
        ticket = Ticket(entries)
        if self._flusher is None and not self._eager and not self._held:
            # An await that never suspends lets one task keep the loop: after
            # EAGER_STREAK eager batches in a row from the same task, its next
            # one is queued, so that task yields once and the loop turns
            # (eventfd callbacks are no task: the loop turns after each).
            task = asyncio.current_task()
            if task is None:
                return self._apply_now(ticket)
            if task is not self._streak_task:
                self._streak_task, self._streak = task, 0
            self._streak += 1
            if self._streak <= EAGER_STREAK:
                return self._apply_now(ticket)
        # A flush is running (or held): queue, so a burst coalesces into its next batch.
        future = ticket.future = asyncio.get_running_loop().create_future()
        self._pending.append(ticket)
        if self._flusher is None and not self._eager:
            self._flusher = asyncio.create_task(self._flush())
        return future

    # ------------------------------------------------------- the live device set

    def add_device(self, device: Device) -> None:
        """Accept notifications for ``device`` (already in :attr:`model`) from now on."""
        self._targets[device.name] = Target.all_of(device)

    def remove_devices(self, names: Iterable[str], reason: str) -> int:
        """Stop accepting notifications for ``names``; fail their queued ones.

        From this call on a notification of these devices is refused as an
        unknown device.  Those accepted but still queued (the engine is held,
        or they wait behind a running batch) fail with code ``REMOVED`` and
        change nothing; those in the batch being applied now complete (wait
        for them with :meth:`settle`).  Returns how many queued ones failed.
        """
        gone = {self._targets.pop(name)[0].device for name in names if name in self._targets}
        failed = 0

        def fail(entry: Target) -> NotifyError:
            nonlocal failed
            why = f"device removed ({reason}) before it was applied"
            error = NotifyError(entry.device.name, entry.vector, "REMOVED", why)
            self.stats.fail(error.code, entry.device.adapter.id)
            self._emit(EngineEvent("failed", entry.device.adapter, error))
            failed += 1
            return error

        if gone:
            self._pending = withdraw(self._pending, gone, fail)
        return failed

    async def settle(self) -> None:
        """Wait until the batch being applied now (if any) has been applied or has failed."""
        futures = [t.future for t in self._applying if t.future is not None and not t.future.done()]
        if futures:
            await asyncio.wait(futures)

    def check_target(self, name: str, vector: int) -> None:
        """Raise ValueError naming the problem unless ``name``/``vector`` exists."""
        targets = self._targets.get(name)
        if targets is None:
            raise ValueError(f"unknown device {name!r}")
        device = targets[0].device
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
                ticket.errors[index] = self._refusal(entry.device, entry.vector)
            ticket.resolve()
        self._held = False
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
        self._held = True
        self._running.clear()

    def resume(self) -> None:
        """Apply held and new notifications again."""
        self._held = False
        self._running.set()

    @property
    def paused(self) -> bool:
        """Whether notifications are being held."""
        return self._held

    @property
    def pending(self) -> int:
        """Notifications accepted but not yet applied."""
        return sum(len(ticket.entries) for ticket in self._pending)

    async def drain(self) -> None:
        """Wait until every accepted notification has been applied or has failed."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    @property
    def simm(self) -> int:
        """The suppression state's single-mode mask (``0x80 >> isc`` per ISC)."""
        return self.suppression.simm

    @simm.setter
    def simm(self, mask: int) -> None:
        self.suppression.simm = mask

    @property
    def nimm(self) -> int:
        """The suppression state's no-interrupt mask."""
        return self.suppression.nimm

    @nimm.setter
    def nimm(self, mask: int) -> None:
        self.suppression.nimm = mask

    def set_ais_mode(self, isc: int, mode: int) -> None:
        """The guest's SIC re-arm: mode ALL (0) clears simm and nimm, SINGLE (1) sets simm."""
        if mode not in (KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE):
            raise ValueError(f"AIS mode {mode} is neither ALL (0) nor SINGLE (1)")
        if self.sink.handles_suppression:
            self.sink.set_ais_mode(isc, mode)
            return
        self.suppression.set_mode(isc, mode)

    def reset_isc(self, isc: int) -> None:
        """Clear ``isc``'s suppression state wherever it is kept: the engine's masks,
        and the kernel's AIS state when the sink (the FLIC) applies suppression.

        Raises OSError when the kernel refuses; the engine's masks are clear by then.
        """
        self.suppression.reset(isc)
        if self.sink.handles_suppression:
            self.sink.reset_ais(isc)

    def reset_suppression(self) -> None:
        """Clear every ISC's simm and nimm, as a FLIC reset does."""
        self.suppression.reset_all()

    # ------------------------------------------------------------ the batches

    def _apply_now(self, ticket: Ticket) -> Outcome:
        """The eager path: run the batch code for ``ticket`` in the caller's callback.

        The batch coroutine is driven by hand; it finishes in the first
        ``send`` unless it must wait (``-EAGAIN`` back-off), and then a flush
        task carries it on, with everything that arrives meanwhile queued
        behind it as for any running flush.
        """
        batch = [ticket]
        coro = self.writer.apply(batch)
        self._eager = True
        try:
            waiting = coro.send(None)
        except StopIteration:
            # Settled; nobody waits on a future: only the latency to record.
            self.stats.latency.observe(time.perf_counter() - ticket.accepted, len(ticket.entries))
            return ticket.errors
        except Exception as exc:  # a bug: the caller gets INTERNAL errors, as from a flush
            log.exception("engine: applying a batch failed")
            self._fail_internal(batch, exc)
            return ticket.errors
        except BaseException as exc:
            self._fail_internal(batch, exc)
            raise
        else:
            future = ticket.future = asyncio.get_running_loop().create_future()
            self._applying = batch  # half applied: a removal waits for it (settle)
            self._flusher = asyncio.create_task(self._flush(Resumed(coro, waiting), batch))
            return future
        finally:
            self._eager = False
            if self._pending and self._flusher is None:  # queued by a listener meanwhile
                self._flusher = asyncio.create_task(self._flush())

    async def _flush(
        self, started: Awaitable[None] | None = None, batch: list[Ticket] | None = None
    ) -> None:
        """Apply pending batches until none is left (first finishing ``started``)."""
        self._streak = 0  # the loop has turned
        try:
            if started is not None and batch is not None:
                await self._settle(batch, started)
            while self._pending:
                if not self._running.is_set():
                    await self._running.wait()
                    continue
                batch, self._pending = self._pending, []
                await self._settle(batch, self.writer.apply(batch))
        finally:
            self._flusher = None

    async def _settle(self, batch: list[Ticket], work: Awaitable[None]) -> None:
        self._applying = batch
        try:
            await work
        except BaseException as exc:  # never leave a caller waiting
            self._fail_internal(batch, exc)
            raise
        finally:
            self._applying = []
        self._settled(batch)

    def _settled(self, batch: list[Ticket]) -> None:
        now = time.perf_counter()
        latency = self.stats.latency
        for ticket in batch:
            latency.observe(now - ticket.accepted, len(ticket.entries))
            ticket.resolve()

    def _fail_internal(self, batch: list[Ticket], exc: BaseException) -> None:
        for ticket in batch:
            for index, entry in enumerate(ticket.entries):
                if ticket.errors[index] is None:
                    error = NotifyError(entry.device.name, entry.vector, "INTERNAL",
                                        f"engine: {exc!r}")  # fmt: skip
                    ticket.errors[index] = error
                    self.stats.fail(error.code, entry.device.adapter.id)
            ticket.resolve()

    def _failed(self, entry: Target, error: NotifyError) -> None:
        """Count, log and announce one failed notification."""
        device = entry.device
        self.stats.fail(error.code, device.adapter.id)
        context = {
            "adapter": device.adapter.name,
            "device": error.device,
            "vector": error.vector,
            "where": error.where,
            "gaddr": error.gaddr,
            "size": error.size,
            "key": error.key,
            "code": error.code,
        }
        log.warning("notify failed: %s", error, extra=context)
        self._emit(EngineEvent("failed", device.adapter, error))

    # ------------------------------------------------------------- interrupts

    def _interrupt(self, adapter: Adapter) -> None:
        stats = self.stats
        if (
            adapter.suppressible
            and not self.sink.handles_suppression
            and not self.suppression.admit(adapter.isc)
        ):
            stats.suppressed(adapter.id)
            if self._listeners:
                self._emit(EngineEvent("suppressed", adapter))
            return
        try:
            self.sink.inject(adapter)
        except OSError as exc:
            # Not a failed notification: its bits and summary are in memory.
            stats.interrupts_failed += 1
            log.error("injecting an interrupt for adapter %s failed: %s", adapter.name, exc)
            return
        stats.injected(adapter.id)
        if self._listeners:  # no event made for nobody
            self._emit(EngineEvent("interrupt", adapter))

    def _emit(self, event: EngineEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("engine listener failed")
