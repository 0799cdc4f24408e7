"""What a notification is to the engine: its target, its ticket, its error.

A :class:`Target` is one (device, vector) with every address the batch code
needs worked out once; a :class:`Ticket` is one caller's list of targets
with a slot per item for its :class:`NotifyError`; a :class:`NotifyError`
says which notification failed, with which code, and where: the dsci or the
summary, at which gaddr, size and key.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from .adapters import Device
from .bitor import OrFailure, window_image
from .errors import IndicatorsError

__all__ = ["NotifyError", "Target", "Ticket", "Where", "WindowKey"]

#: Where a notification failed: its dsci bit, its summary, or before either.
Where = Literal["dsci", "summary", "engine"]

#: A 16-byte window and the access key a cmpxchg on it runs under.
WindowKey = tuple[int, int | None]


class NotifyError(IndicatorsError):
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
        "aid", "bits", "bshift", "byte", "device", "head", "image", "lead", "simage", "skey",
        "solo", "sshift", "stest", "swkey", "vector", "wkey",
    )  # fmt: skip
    #: The device's adapter id (what the per-adapter counters are keyed by).
    aid: int
    #: The 16-byte window of the dsci bit and the key the cmpxchg runs under.
    wkey: WindowKey
    #: The bit placed in the window's 128-bit big-endian image.
    image: int
    #: The summary bit in its window's image, the window and key, the summary
    #: byte and key its store is checked under, where that byte sits in the
    #: image, and what of the old byte says "was clear" (the byte, as QEMU;
    #: the bit, as KVM).
    simage: int
    swkey: WindowKey
    skey: tuple[int, int | None]
    sshift: int
    stest: int
    #: The dsci bit in its byte, and where that byte sits in the window's image.
    bits: int
    bshift: int
    #: The device's first target (vector 0), and the device's first target in
    #: this one's dsci byte: a batch's plan ORs its bits per ``lead`` in small
    #: integers and goes over devices by ``head``.
    head: Target
    lead: Target
    #: The plan of a batch of just this notification, made on first use and
    #: kept here by :func:`indicators.batch.plan` (an ``indicators.batch.Plan``:
    #: typed loosely, since the batch code is built on this module, not under it).
    solo: object | None

    def __init__(
        self, device: Device, vector: int, first: Target | None = None, lead: Target | None = None
    ) -> None:
        bit = device.dsci[vector]
        window, image = window_image(bit.gaddr, bit.mask)
        self.device = device
        self.vector = vector
        self.byte = bit.gaddr
        self.bits = bit.mask
        self.bshift = (15 - (bit.gaddr & 15)) << 3
        self.wkey = (window, device.key)
        if first is not None and first.wkey == self.wkey:
            self.wkey = first.wkey  # one object per window: a model of 8,000 devices stays small
        self.image = image
        self.head = first or self
        self.lead = lead or self
        self.solo = None
        if first is not None:  # the device's summary: share its values
            self.simage, self.swkey, self.skey = first.simage, first.swkey, first.skey
            self.sshift, self.stest, self.aid = first.sshift, first.stest, first.aid
            return
        self.aid = device.adapter.id
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
        leads = {first.byte: first}
        for vector in range(1, device.vectors):
            lead = leads.get(device.dsci[vector].gaddr)
            target = targets[vector] = cls(device, vector, first, lead)
            leads.setdefault(target.byte, target)
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
