"""One batch of notifications written into guest memory, all or nothing per notification.

:class:`BatchWriter` takes a batch of tickets (each a caller's list of
targets, one device's one vector; see :mod:`indicators.notification`) and
writes what QEMU and KVM write, in their order:

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

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, cast

from .adapters import Adapter, Device
from .bitor import BitSetter, OrFailure
from .memop import TransientError
from .notification import NotifyError, Target, Ticket, Where, WindowKey
from .stats import EngineStats

__all__ = ["BatchWriter", "Plan", "plan"]

log = logging.getLogger(__name__)

# Read-only empties for the common case of a batch with no failure.
_NO_FAILURES: dict[int, OrFailure] = {}
_NO_DEVICES: set[Device] = set()


class Plan:
    """What a batch writes, worked out before anything is written.

    ``counts``: the notifications per target; ``windows``: per dsci window
    and key, the image of the bits to set; ``heads``: each device's first
    target (it carries the device's summary values), in the batch's order;
    ``summaries``: per summary window and key, ``[image, heads]``; ``checks``:
    per summary byte and key, a head whose store check stands for it;
    ``per_adapter``: the notifications per adapter id; ``total``: all of them.
    Nothing here changes once made, so a batch of one target keeps its plan
    in the target (:attr:`Target.solo`).
    """

    __slots__ = ("checks", "counts", "heads", "per_adapter", "summaries", "total", "windows")

    def __init__(
        self,
        counts: dict[Target, int],
        windows: dict[WindowKey, int],
        heads: list[Target],
        per_adapter: dict[int, int],
        total: int,
    ) -> None:
        self.counts = counts
        self.windows = windows
        self.heads = heads
        self.per_adapter = per_adapter
        self.total = total
        self.summaries = _summary_groups(heads)
        self.checks = {head.skey: head for head in heads}


def plan(batch: list[Ticket]) -> Plan:
    """The plan of ``batch``.  A batch of one target (the eager path's) is planned
    once per target, by the same code, and the plan kept in the target."""
    if len(batch) == 1 and len(batch[0].entries) == 1:
        target = batch[0].entries[0]
        solo = target.solo
        if solo is None:
            solo = target.solo = _plan_of({target: 1}, 1)
        return cast(Plan, solo)
    counts: Counter[Target] = Counter()
    for ticket in batch:
        counts.update(ticket.entries)
    return _plan_of(counts, counts.total())


def _plan_of(counts: dict[Target, int], total: int) -> Plan:
    """The one pass over every distinct target, in small integers: the bits are ORed
    per dsci byte (the ``lead`` target of a device's byte) and only then placed in
    their windows, so that the pass makes no large integer and hashes no tuple."""
    per_byte: dict[Target, int] = {}
    get = per_byte.get
    for target in counts:
        lead = target.lead
        per_byte[lead] = get(lead, 0) | target.bits
    windows: dict[WindowKey, int] = {}
    heads: dict[Target, None] = {}
    for lead, bits in per_byte.items():
        wkey = lead.wkey
        windows[wkey] = windows.get(wkey, 0) | bits << lead.bshift
        heads[lead.head] = None
    aids = {head.aid for head in heads}
    if len(aids) == 1:
        per_adapter = {aids.pop(): total}
    else:
        per_adapter = {}
        for target, count in counts.items():
            per_adapter[target.aid] = per_adapter.get(target.aid, 0) + count
    return Plan(counts, windows, list(heads), per_adapter, total)


class BatchWriter:
    """Writes batches through ``setter``; ``on_fail`` hears of every failed notification
    and ``on_due`` of every adapter due an interrupt (the engine decides suppression
    and delivers).

    ``set_counts``, when not None, counts per (device, vector) the applied
    notifications that found their bit clear and set it.
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
        single suspension and without a coroutine per step.  Only the plan
        goes over every distinct target; the steps go over windows and
        devices, and which bits this batch turned on is worked out only when
        something failed or ``set_counts`` asks.
        """
        work = plan(batch)
        or_now = self.setter.or_window_now
        # Step 1: check the summaries' stores.
        check = self.setter.check
        refused: set[Device] = _NO_DEVICES
        for where in work.checks:
            try:
                check(where[0], 1, where[1])
            except OrFailure as refusal:
                refused = self._refuse(batch, work, where, refusal, refused)
        # Step 2: the dsci bits.  found: per window, the image before and the bytes that failed.
        found: dict[WindowKey, tuple[int, dict[int, OrFailure]]] = {}
        clean = not refused  # so far every notification of the batch is on its way
        for wkey, mask in work.windows.items():
            if refused:
                mask = _image(t for t in work.counts if t.wkey == wkey and t.device not in refused)
                if not mask:
                    continue
            try:
                old, failed = or_now(wkey[0], mask, wkey[1]), _NO_FAILURES
            except (TransientError, OrFailure) as exc:
                old, failed = await self._or_slowly(wkey, mask, exc)
                if failed:
                    clean = False
                    for gaddr, failure in failed.items():
                        self._fail_where(batch, failure, "dsci", _in_byte(wkey, gaddr))
            found[wkey] = old, failed
        written = None if clean and self.set_counts is None else _written(work, found, refused)
        # Step 3: the summaries of the devices with a bit in memory.
        summaries = work.summaries if clean else _summary_groups(_heads(written or {}))
        due: dict[int, Adapter] = {}
        lost: dict[Device, OrFailure] = {}
        for swkey, (smask, members) in summaries.items():
            try:
                old, failed = or_now(swkey[0], smask, swkey[1]), _NO_FAILURES
            except (TransientError, OrFailure) as exc:
                old, failed = await self._or_slowly(swkey, smask, exc)
            self._summary_done(members, old, failed, due, lost)
        if lost:
            clean = False
            if written is None:
                written = _written(work, found, refused)
            notes = await self._undo(lost, written)
            for device, failure in lost.items():
                note = notes.get(device, "")
                self._fail_where(batch, failure, "summary", _of_device(device), note)
        # Step 4: count what is acknowledged; the interrupts, one per adapter.
        self._count(work, written, lost, clean)
        on_due = self.on_due
        for adapter in due.values():
            on_due(adapter)

    # ----------------------------------------------------------------- steps

    def _refuse(
        self,
        batch: list[Ticket],
        work: Plan,
        where: tuple[int, int | None],
        failure: OrFailure,
        refused: set[Device],
    ) -> set[Device]:
        """Step 1 failed for the summary byte and key ``where``: fail the notifications
        of its devices (they write nothing); returns the devices refused so far."""
        for head in work.heads:
            if head.skey == where:
                if not refused:
                    refused = set()
                refused.add(head.device)
                self._fail_where(batch, failure, "summary", _of_device(head.device))
        return refused

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
        self,
        work: Plan,
        written: dict[Target, bool] | None,
        lost: dict[Device, OrFailure],
        clean: bool,
    ) -> None:
        """Step 4: count the acknowledged notifications (and only those).

        When every notification of the batch was acknowledged (``clean``)
        the plan's counts per adapter are the answer: no target is looked at.
        """
        stats = self.stats
        if clean:
            per_adapter = work.per_adapter
            stats.applied += work.total
            stats.merged += work.total - len(work.counts)
        else:
            assert written is not None
            counts = work.counts
            per_adapter = {}
            for target in written:
                if lost and target.device in lost:
                    continue
                count = counts[target]
                stats.applied += count
                stats.merged += count - 1
                per_adapter[target.aid] = per_adapter.get(target.aid, 0) + count
        stats.applied_to_each(per_adapter)
        set_counts = self.set_counts
        if set_counts is not None and written is not None:
            for target, turned_on in written.items():
                if turned_on and not (lost and target.device in lost):
                    set_counts[(target.device.name, target.vector)] += 1

    # ---------------------------------------------------------------- helpers

    async def _or_slowly(
        self, wkey: WindowKey, mask: int, exc: Exception
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
        self, wkey: WindowKey, mask: int, first: OrFailure
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
        groups: dict[WindowKey, list[Any]] = {}  # window -> [mask, devices]
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


def _in_byte(wkey: WindowKey, gaddr: int) -> Callable[[Target], bool]:
    """Targets whose dsci bit is in the byte at ``gaddr`` of window ``wkey``."""
    return lambda entry: entry.wkey == wkey and entry.byte == gaddr


def _image(targets: Iterable[Target]) -> int:
    """The window image of these targets' dsci bits."""
    mask = 0
    for target in targets:
        mask |= target.image
    return mask


def _written(
    work: Plan, found: dict[WindowKey, tuple[int, dict[int, OrFailure]]], refused: set[Device]
) -> dict[Target, bool]:
    """The targets whose dsci bit is in memory, each with whether this batch turned it
    on (found it clear): for the counts, the summaries and an undo after a failure."""
    written: dict[Target, bool] = {}
    for target in work.counts:
        result = found.get(target.wkey)
        if result is None or (refused and target.device in refused):
            continue
        old, failed = result
        if failed and target.byte in failed:
            continue
        written[target] = not old & target.image
    return written


def _heads(written: dict[Target, bool]) -> list[Target]:
    """The first target of each device with a bit in memory."""
    return list(dict.fromkeys(target.head for target in written))


def _summary_groups(heads: list[Target]) -> dict[WindowKey, list[Any]]:
    """The devices by summary window and key: ``[image of their summary bits, a target
    of each]``."""
    groups: dict[WindowKey, list[Any]] = {}
    for target in heads:
        group = groups.get(target.swkey)
        if group is None:
            groups[target.swkey] = [target.simage, [target]]
        else:
            group[0] |= target.simage
            group[1].append(target)
    return groups
