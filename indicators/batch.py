"""One batch of notifications written into guest memory, all or nothing per notification.

:class:`BatchWriter` takes a batch of :class:`Ticket` objects (each a
caller's list of :class:`Target`, one device's one vector) and writes what
QEMU and KVM write, in their order:

1. **check**: the store access of every summary the batch will set is
   checked once (``backend.check``, the memop's ``F_CHECK_ONLY``), before
   any dsci bit is written.  A notification whose summary cannot be stored
   fails here and writes nothing.
2. **dsci**: the bits are ORed per 16-byte window and access key with one
   cmpxchg.  A cmpxchg that fails wrote nothing; the window is then retried
   byte by byte, so only the notifications whose own byte cannot be set fail.
3. **summary**: each summary window is ORed once, for the devices with a
   dsci bit in memory.  If that store fails although its check passed, the
   dsci bits this batch turned on for those devices are cleared again with a
   cmpxchg that clears only them and only while they are still set, and the
   notifications fail.
4. **outcome**: only notifications whose bit and summary are in memory are
   counted as applied; the summary's old value decides which adapters are
   due an interrupt (the caller delivers at most one per adapter).

Why both a check and an undo: the check makes the common failure (a
storage-key mismatch that exists before the batch starts) write nothing at
all, so the guest never sees a bit appear and vanish, and the undo covers
what no check can: the guest changing a page's storage key with SSKE
between the check and the store, or a store failing for a reason the
kernel's check does not look at (a read-only memslot with key 0, an
injected fault).

The race that remains, and what the service does then:

- a guest that scans its dsci between our store and the undo (another
  summary of the adapter interrupted it, or it polls) consumes the bit and
  handles a notification that is then reported failed.  It sees one
  spurious indication, which drivers tolerate (the queue is empty or is
  serviced early); the service reports the notification failed and does not
  count it as applied, because it cannot know whether the guest looked;
- if the undo itself fails (SSKE changed the dsci page's key too), the bits
  stay set behind a clear summary: the service logs an error naming them,
  counts them in ``stats.stranded``, and says so in the notification's
  error.  The guest finds them at its next scan of that adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from .adapters import Adapter, Device
from .bitor import BitSetter, OrFailure, window_image
from .memop import TransientError
from .stats import EngineStats

__all__ = ["BatchWriter", "NotifyError", "Target", "Ticket"]

log = logging.getLogger(__name__)

#: Where a notification failed: its dsci bit, its summary, or before either.
Where = Literal["dsci", "summary", "engine"]

# A 16-byte window and the access key a cmpxchg on it runs under.
_WindowKey = tuple[int, int | None]
_NO_FAILURES: dict[int, OrFailure] = {}  # read only
_NO_DEVICES: set[Device] = set()  # read only


class NotifyError(Exception):
    """A notification that could not be applied (guest memory is as it was).

    ``code`` is the program interruption code (``"4"``, ``"5"``), the errno
    name (``"EINVAL"``, ``"EAGAIN"``), ``"NO_XCHG_LIMIT"``, ``"UNAVAILABLE"``
    or ``"INTERNAL"``; ``errno`` the errno number when the backend gave one;
    ``where`` which access failed (``"dsci"``, ``"summary"``, or
    ``"engine"`` when none was tried); ``gaddr``, ``size`` and ``key`` that
    access; ``cause`` the backend's error when there was one.
    """

    def __init__(
        self,
        device: str,
        vector: int,
        code: str,
        desc: str,
        *,
        where: Where = "engine",
        gaddr: int | None = None,
        size: int | None = None,
        key: int | None = None,
        errno: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        self.device = device
        self.vector = vector
        self.code = code
        self.desc = desc
        self.where = where
        self.gaddr = gaddr
        self.size = size
        self.key = key
        self.errno = errno
        self.cause = cause
        text = f"device {device!r} vector {vector}: "
        if gaddr is not None:
            shown = "none" if key is None else key
            text += f"{where} at gaddr {gaddr:#x} size {size} key {shown}: "
        super().__init__(f"{text}{desc} (code {code})")

    @classmethod
    def of(cls, failure: OrFailure, target: Target, where: Where, note: str = "") -> NotifyError:
        """The error of ``target``'s notification, failed by ``failure`` at ``where``."""
        return cls(
            target.device.name,
            target.vector,
            failure.code,
            failure.desc + note,
            where=where,
            gaddr=failure.gaddr,
            size=failure.size,
            key=failure.key,
            errno=failure.errno,
            cause=failure.cause,
        )


class Target:
    """One (device, vector) with its addresses worked out, shared by every notification of it.

    Identity-hashed, so counting a burst's notifications per target is a
    C-speed ``Counter.update``.
    """

    __slots__ = (
        "byte", "device", "image", "simage", "skey", "sshift", "stest", "swkey", "vector", "wkey",
    )  # fmt: skip
    #: The 16-byte window of the dsci bit and the key the cmpxchg runs under.
    wkey: _WindowKey
    #: The bit placed in the window's 128-bit big-endian image.
    image: int
    #: The summary bit in its window's image, the window and key, the summary
    #: byte and key its store is checked under, where that byte sits in the
    #: image, and what of the old byte says "was clear" (the byte, as QEMU;
    #: the bit, as KVM).
    simage: int
    swkey: _WindowKey
    skey: tuple[int, int | None]
    sshift: int
    stest: int

    def __init__(self, device: Device, vector: int, first: Target | None = None) -> None:
        bit = device.dsci[vector]
        window, image = window_image(bit.gaddr, bit.mask)
        self.device = device
        self.vector = vector
        self.byte = bit.gaddr
        self.wkey = (window, device.key)
        if first is not None and first.wkey == self.wkey:
            self.wkey = first.wkey  # one object per window: a model of 8,000 devices stays small
        self.image = image
        if first is not None:  # the device's summary: share its values
            self.simage, self.swkey, self.skey = first.simage, first.swkey, first.skey
            self.sshift, self.stest = first.sshift, first.stest
            return
        summary = device.summary
        swindow, self.simage = window_image(summary.gaddr, summary.mask)
        self.swkey = (swindow, device.key)
        self.skey = (summary.gaddr, device.key)
        self.sshift = (15 - (summary.gaddr & 15)) << 3
        self.stest = 0xFF if device.summary_test == "byte" else summary.mask

    @classmethod
    def all_of(cls, device: Device) -> dict[int, Target]:
        """Every vector's target of ``device``, by vector."""
        first = cls(device, 0)
        targets = {0: first}
        for vector in range(1, device.vectors):
            targets[vector] = cls(device, vector, first)
        return targets


class Ticket:
    """One caller's notifications: each is applied or failed within one batch."""

    __slots__ = ("accepted", "entries", "errors", "future")

    def __init__(self, entries: list[Target]) -> None:
        self.entries = entries
        self.errors: list[NotifyError | None] = [None] * len(entries)
        #: Made only when the caller has to wait (the eager path needs none).
        self.future: asyncio.Future[list[NotifyError | None]] | None = None
        self.accepted = time.perf_counter()

    def resolve(self) -> None:
        """Hand the outcome to a waiting caller."""
        future = self.future
        if future is not None and not future.done():
            future.set_result(self.errors)


class BatchWriter:
    """Writes batches through ``setter``; ``on_fail`` hears of every failed notification
    and ``on_due`` of every adapter due an interrupt (the engine decides suppression
    and delivers).

    ``set_counts``, when
    not None, counts per (device, vector) the applied notifications that
    found their bit clear and set it.
    """

    def __init__(
        self,
        setter: BitSetter,
        stats: EngineStats,
        on_fail: Callable[[Target, NotifyError], None],
        on_due: Callable[[Adapter], None],
    ) -> None:
        self.setter = setter
        self.stats = stats
        self.on_fail = on_fail
        self.on_due = on_due
        self.set_counts: Counter[tuple[str, int]] | None = None

    async def apply(self, batch: list[Ticket]) -> None:
        """Write ``batch``, fail (in its tickets) each notification that could not be,
        then hand each adapter due an interrupt to ``on_due``, once.

        Each OR is tried without waiting first and only a failure or
        ``-EAGAIN`` takes the slow road, so that a batch that meets neither
        (an idle engine's batch of one, above all) runs through without a
        single suspension and without a coroutine per step.
        """
        if len(batch) == 1 and len(batch[0].entries) == 1:
            counts: dict[Target, int] = {batch[0].entries[0]: 1}  # the eager batch of one
        else:
            counts = Counter()
            for ticket in batch:
                counts.update(ticket.entries)
        or_now = self.setter.or_window_now
        # Step 1: check the summaries' stores.
        refused = self._check_summaries(batch, counts)
        # Step 2: the dsci bits.
        written: dict[Target, bool] = {}
        for wkey, (mask, members) in _groups(counts, refused).items():
            try:
                old, failed = or_now(wkey[0], mask, wkey[1]), _NO_FAILURES
            except (TransientError, OrFailure) as exc:
                old, failed = await self._or_slowly(wkey, mask, exc)
            self._dsci_done(batch, wkey, members, old, failed, written)
        # Step 3: the summaries of the devices with a bit in memory.
        due: dict[int, Adapter] = {}
        lost: dict[Device, OrFailure] = {}
        for swkey, (smask, members) in _summary_groups(written).items():
            try:
                old, failed = or_now(swkey[0], smask, swkey[1]), _NO_FAILURES
            except (TransientError, OrFailure) as exc:
                old, failed = await self._or_slowly(swkey, smask, exc)
            self._summary_done(members, old, failed, due, lost)
        if lost:
            notes = await self._undo(lost, written)
            for device, failure in lost.items():
                note = notes.get(device, "")
                self._fail_where(batch, failure, "summary", _of_device(device), note)
        # Step 4: count what is acknowledged; the interrupts, one per adapter.
        self._count(counts, written, lost)
        on_due = self.on_due
        for adapter in due.values():
            on_due(adapter)

    # ----------------------------------------------------------------- steps

    def _check_summaries(self, batch: list[Ticket], counts: dict[Target, int]) -> set[Device]:
        """Step 1: the devices whose summary cannot be stored (their notifications fail)."""
        check = self.setter.check
        if len(counts) == 1:  # the batch of one: no bookkeeping of what was checked
            (target,) = counts
            try:
                check(target.skey[0], 1, target.skey[1])
                return _NO_DEVICES
            except OrFailure as refusal:
                self._fail_where(batch, refusal, "summary", _of_device(target.device))
                return {target.device}
        checked: dict[tuple[int, int | None], OrFailure | None] = {}  # summary byte, key
        refused: set[Device] = set()
        for target in counts:
            where = target.skey
            if where in checked:
                failure = checked[where]
            else:
                try:
                    check(where[0], 1, where[1])
                    failure = checked[where] = None
                except OrFailure as exc:
                    failure = checked[where] = exc
            if failure is not None and target.device not in refused:
                refused.add(target.device)
                self._fail_where(batch, failure, "summary", _of_device(target.device))
        return refused

    def _dsci_done(
        self,
        batch: list[Ticket],
        wkey: _WindowKey,
        members: list[Target],
        old: int,
        failed: dict[int, OrFailure],
        written: dict[Target, bool],
    ) -> None:
        """Step 2, one window: fail the bytes that failed; note which bits this batch
        turned on (the ones found clear) for the counts and for an undo."""
        for gaddr, failure in failed.items():
            self._fail_where(batch, failure, "dsci", _in_byte(wkey, gaddr))
        for target in members:
            if target.byte not in failed:
                written[target] = not old & target.image

    def _summary_done(
        self,
        members: list[Target],
        old: int,
        failed: dict[int, OrFailure],
        due: dict[int, Adapter],
        lost: dict[Device, OrFailure],
    ) -> None:
        """Step 3, one window: a device whose summary went from clear to set (by its
        summary test) makes its adapter due; one whose summary failed is lost."""
        for target in members:
            failure = failed.get(target.skey[0]) if failed else None
            if failure is not None:
                lost[target.device] = failure
            elif not (old >> target.sshift) & target.stest:
                adapter = target.device.adapter
                if adapter.id in due:
                    self.stats.interrupts_coalesced += 1
                due[adapter.id] = adapter

    def _count(
        self, counts: dict[Target, int], written: dict[Target, bool], lost: dict[Device, OrFailure]
    ) -> None:
        """Step 4: count the acknowledged notifications (and only those)."""
        stats = self.stats
        set_counts = self.set_counts
        per_adapter: dict[int, int] = {}
        for target, turned_on in written.items():
            device = target.device
            if lost and device in lost:
                continue
            count = counts[target]
            stats.applied += count
            stats.merged += count - 1
            aid = device.adapter.id
            per_adapter[aid] = per_adapter.get(aid, 0) + count
            if set_counts is not None and turned_on:
                set_counts[(device.name, target.vector)] += 1
        for aid, count in per_adapter.items():
            stats.applied_to(aid, count)

    # ---------------------------------------------------------------- helpers

    async def _or_slowly(
        self, wkey: _WindowKey, mask: int, exc: Exception
    ) -> tuple[int, dict[int, OrFailure]]:
        """The road for a window whose OR met ``-EAGAIN`` or failed (``exc``): back off
        and retry, then, if it still fails, go byte by byte."""
        if isinstance(exc, TransientError):
            try:
                return await self.setter.or_window_later(wkey[0], mask, wkey[1], exc), _NO_FAILURES
            except OrFailure as failure:
                return await self._bytewise(wkey, mask, failure)
        if isinstance(exc, OrFailure):
            return await self._bytewise(wkey, mask, exc)
        raise exc

    async def _bytewise(
        self, wkey: _WindowKey, mask: int, first: OrFailure
    ) -> tuple[int, dict[int, OrFailure]]:
        """A window's OR failed (writing nothing): retry byte by byte, so that one byte
        that cannot be set does not fail its neighbours.

        Returns the window's image before the OR and the bytes that failed, by gaddr.
        """
        window, key = wkey
        failed: dict[int, OrFailure] = {}
        old = 0
        for offset in range(16):
            shift = (15 - offset) << 3
            bits = (mask >> shift) & 0xFF
            if not bits:
                continue
            gaddr = window + offset
            if mask == bits << shift:  # a single byte: the first failure is its own
                failed[gaddr] = first
                break
            try:
                old |= await self.setter.or_bits(gaddr, 1, bits, key) << shift
            except OrFailure as failure:
                failed[gaddr] = failure
        return old, failed

    async def _undo(
        self, lost: dict[Device, OrFailure], written: dict[Target, bool]
    ) -> dict[Device, str]:
        """Clear the dsci bits this batch turned on for the devices whose summary failed,
        one cmpxchg per window; returns, per device, a note for its notifications'
        errors when its bits could not be cleared."""
        groups: dict[_WindowKey, list[Any]] = {}  # window -> [mask, devices]
        for target, turned_on in written.items():
            if turned_on and target.device in lost:
                group = groups.get(target.wkey)
                if group is None:
                    group = groups[target.wkey] = [0, set()]
                group[0] |= target.image
                group[1].add(target.device)
        notes: dict[Device, str] = {}
        for (window, key), (mask, devices) in groups.items():
            try:
                cleared = await self.setter.clear_window(window, mask, key)
            except OrFailure as failure:
                stranded = mask.bit_count()
                self.stats.stranded += stranded
                names = ", ".join(sorted(device.name for device in devices))
                log.error(
                    "device %s: %d dsci bit(s) in window %#x stay set behind a clear summary: "
                    "clearing them failed: %s (code %s)",
                    names, stranded, window, failure.desc, failure.code,
                )  # fmt: skip
                for device in devices:
                    notes[device] = (
                        f"; its dsci bits stay set (clearing them failed with code {failure.code})"
                    )
                continue
            self.stats.undone += cleared.bit_count()
        return notes

    def _fail_where(
        self,
        batch: list[Ticket],
        failure: OrFailure,
        where: Where,
        which: Callable[[Target], bool],
        note: str = "",
    ) -> None:
        """Fail the not yet failed notifications of ``batch`` whose target is ``which``."""
        for ticket in batch:
            errors = ticket.errors
            for index, entry in enumerate(ticket.entries):
                if errors[index] is None and which(entry):
                    error = NotifyError.of(failure, entry, where, note)
                    errors[index] = error
                    self.on_fail(entry, error)


def _of_device(device: Device) -> Callable[[Target], bool]:
    """Targets of ``device`` (its summary could not be set)."""
    return lambda entry: entry.device is device


def _in_byte(wkey: _WindowKey, gaddr: int) -> Callable[[Target], bool]:
    """Targets whose dsci bit is in the byte at ``gaddr`` of window ``wkey``."""
    return lambda entry: entry.wkey == wkey and entry.byte == gaddr


def _groups(counts: dict[Target, int], refused: set[Device]) -> dict[_WindowKey, list[Any]]:
    """The dsci targets by window and key: ``[image of their bits, targets]``."""
    groups: dict[_WindowKey, list[Any]] = {}
    for target in counts:
        if refused and target.device in refused:
            continue
        group = groups.get(target.wkey)
        if group is None:
            groups[target.wkey] = [target.image, [target]]
        else:
            group[0] |= target.image
            group[1].append(target)
    return groups


def _summary_groups(written: dict[Target, bool]) -> dict[_WindowKey, list[Any]]:
    """One target per device with a bit in memory, by summary window and key:
    ``[image of their summary bits, targets]``."""
    groups: dict[_WindowKey, list[Any]] = {}
    devices: set[Device] = set()
    for target in written:
        device = target.device
        if device in devices:
            continue
        devices.add(device)
        group = groups.get(target.swkey)
        if group is None:
            groups[target.swkey] = [target.simage, [target]]
        else:
            group[0] |= target.simage
            group[1].append(target)
    return groups
