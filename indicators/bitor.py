"""Atomic ORs of bits into guest memory: the cmpxchg retry loops under the engine.

:class:`BitSetter` ORs bits into 1/2/4/8/16 naturally aligned bytes through a
memop backend's key-checked cmpxchg and returns the value it found:

- a failed compare (``R_NO_XCHG``) retries from the value the backend
  returned, and stops without writing once the bits are already set;
- ``-EAGAIN`` backs off exponentially with jitter (``asyncio.sleep``);
- anything else, or a bound of the :class:`~indicators.config.RetryPolicy`,
  raises :class:`OrFailure` with the kernel's code, the address, size and key.

:meth:`BitSetter.or_window` takes a 16-byte window's bits as one 128-bit
big-endian image and uses one cmpxchg of the smallest aligned size covering
them.  :meth:`BitSetter.clear_window` is the inverse the engine needs to
undo its own bits (it clears only bits still set, and only those), and
:meth:`BitSetter.check` asks the backend whether a store would pass without
making it.  Counts go to the engine's :class:`~indicators.stats.EngineStats`.
"""

from __future__ import annotations

import asyncio
import errno
import random

from .config import RetryPolicy
from .memop import MemopBackend, MemopError, ProgramException, TransientError
from .stats import EngineStats

__all__ = ["BitSetter", "OrFailure", "errno_name", "window_image"]

_SIZES = (1, 2, 4, 8, 16)
_COVERS_KEPT = 4096


class OrFailure(Exception):
    """An OR (or its undo, or a check) that could not be done.

    ``code`` is a program interruption code (``"4"``, ``"5"``), an errno
    name (``"EAGAIN"``) or ``"NO_XCHG_LIMIT"``; ``errno`` the errno number
    when there was one; ``desc`` what happened; ``gaddr``, ``size`` and
    ``key`` the access; ``cause`` the backend's error.
    """

    def __init__(
        self,
        code: str,
        desc: str,
        gaddr: int,
        size: int,
        key: int | None,
        cause: BaseException | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(desc)
        self.code, self.desc, self.gaddr, self.size, self.key = code, desc, gaddr, size, key
        self.cause = cause
        self.errno = errno

    @classmethod
    def of(cls, exc: MemopError, gaddr: int, size: int, key: int | None) -> OrFailure:
        """The failure a backend error stands for."""
        if isinstance(exc, ProgramException):
            return cls(str(exc.code), exc.reason, gaddr, size, key, exc)
        return cls(errno_name(exc.errno), exc.reason, gaddr, size, key, exc, exc.errno)


def errno_name(number: int | None) -> str:
    """``EAGAIN`` for 11, and so on."""
    return errno.errorcode.get(number or 0, str(number))


def window_image(gaddr: int, mask: int) -> tuple[int, int]:
    """The 16-byte window holding ``gaddr`` and ``mask`` placed in its 128-bit image."""
    return gaddr & ~15, mask << ((15 - (gaddr & 15)) << 3)


def _covering(mask: int) -> tuple[int, int, int]:
    """Offset, size and image shift of the smallest aligned access covering ``mask``'s bytes."""
    first = 15 - ((mask.bit_length() - 1) >> 3)
    last = 15 - (((mask & -mask).bit_length() - 1) >> 3)
    for size in _SIZES:
        if first // size == last // size:
            break
    start = first - first % size
    return start, size, (16 - start - size) << 3


class BitSetter:
    """ORs bits through ``backend`` under ``policy``, counting into ``stats``."""

    def __init__(self, backend: MemopBackend, policy: RetryPolicy, stats: EngineStats) -> None:
        self.backend = backend
        self.policy = policy
        self.stats = stats
        self._random = random.Random()
        # The last value seen per (gaddr, size): the next cmpxchg's guess.
        self._seen: dict[int, int] = {}  # keyed by gaddr << 5 | size: an int hashes fast
        # Per window image: offset, size and shift of the access covering it.
        self._covers: dict[int, tuple[int, int, int]] = {}

    def check(self, gaddr: int, size: int, key: int | None) -> None:
        """Raise :class:`OrFailure` unless the backend says a store here would pass.

        A backend that cannot check (a test double) passes: the engine's undo
        still keeps a failed notification out of guest memory.
        """
        try:
            self.backend.check(gaddr, size, key, store=True)
        except NotImplementedError:
            return
        except MemopError as exc:
            raise OrFailure.of(exc, gaddr, size, key) from exc

    async def or_window(self, window: int, mask: int, key: int | None) -> int:
        """OR ``mask`` (a 128-bit big-endian image of the window) with one cmpxchg
        of the smallest aligned size covering its bytes; return the window's old image."""
        try:
            return self.or_window_now(window, mask, key)
        except TransientError as exc:
            return await self.or_window_later(window, mask, key, exc)

    def or_window_now(self, window: int, mask: int, key: int | None) -> int:
        """:meth:`or_window` without waiting: ``-EAGAIN`` escapes as TransientError,
        having written nothing; continue with :meth:`or_window_later`.

        The loop is synchronous so that an idle engine's batch of one finishes
        in its caller's callback; only the back-off needs the event loop.  Its
        first round (the guess right: one cmpxchg) is written out here, without
        the generic loop's branches; a failed compare carries on in :meth:`_loop`.
        """
        start, size, shift = self._covers.get(mask) or self._cover(mask)
        gaddr, bits = window + start, mask >> shift
        where = gaddr << 5 | size
        current = self._seen.get(where, 0) & ~bits
        self.stats.cmpxchg += 1
        try:
            exchanged, found = self.backend.cmpxchg(gaddr, size, current, current | bits, key)
        except TransientError:
            raise
        except MemopError as exc:
            raise OrFailure.of(exc, gaddr, size, key) from exc
        if exchanged:
            self._seen[where] = current | bits
            return current << shift
        self.stats.no_xchg += 1
        return self._loop(gaddr, size, bits, key, True, found, 1) << shift

    async def or_window_later(
        self, window: int, mask: int, key: int | None, exc: MemopError
    ) -> int:
        """:meth:`or_window` after :meth:`or_window_now` met ``-EAGAIN`` (``exc``)."""
        start, size, shift = self._cover(mask)
        return await self._backing_off(window + start, size, mask >> shift, key, True, exc) << shift

    async def clear_window(self, window: int, mask: int, key: int | None) -> int:
        """Clear those bits of ``mask`` (a window image) that are still set, and no
        other; return the image of the bits it cleared."""
        start, size, shift = self._cover(mask)
        gaddr, bits = window + start, mask >> shift
        try:
            cleared = self._loop(gaddr, size, bits, key, False)
        except TransientError as exc:
            cleared = await self._backing_off(gaddr, size, bits, key, False, exc)
        return cleared << shift

    async def or_bits(self, gaddr: int, size: int, bits: int, key: int | None) -> int:
        """The cmpxchg retry loop; returns the value found before the OR.

        The first guess is the last value seen here without ``bits``: right
        when the guest consumed our bits since, and when they are still set
        the compare fails and shows it, so nothing is written.
        """
        try:
            return self._loop(gaddr, size, bits, key, True)
        except TransientError as exc:
            return await self._backing_off(gaddr, size, bits, key, True, exc)

    def _cover(self, mask: int) -> tuple[int, int, int]:
        cover = self._covers.get(mask)
        if cover is None:
            if len(self._covers) >= _COVERS_KEPT:  # bursts make many masks: stay bounded
                self._covers.clear()
            cover = self._covers[mask] = _covering(mask)
        return cover

    def _loop(
        self,
        gaddr: int,
        size: int,
        bits: int,
        key: int | None,
        setting: bool,
        current: int | None = None,
        rounds: int = 0,
    ) -> int:
        """Set (or clear) ``bits`` without waiting; returns the value found before (or
        the bits cleared).  ``-EAGAIN`` escapes as TransientError, having written nothing.

        ``current`` and ``rounds`` carry on a loop whose first compare failed.
        """
        where = gaddr << 5 | size
        if current is None:
            seen = self._seen.get(where, 0)
            # Setting guesses the bits clear; clearing guesses them set (the
            # engine clears only bits it has just set).
            current = seen & ~bits if setting else seen | bits
        backend, stats = self.backend, self.stats
        if rounds >= self.policy.max_no_xchg_rounds:
            raise OrFailure("NO_XCHG_LIMIT", f"no exchange after {rounds} rounds", gaddr, size, key)
        while (current & bits != bits) if setting else (current & bits):
            new = current | bits if setting else current & ~bits
            stats.cmpxchg += 1
            try:
                exchanged, found = backend.cmpxchg(gaddr, size, current, new, key)
            except TransientError:
                raise
            except MemopError as exc:
                raise OrFailure.of(exc, gaddr, size, key) from exc
            if exchanged:
                self._seen[where] = new
                return current if setting else current & bits
            stats.no_xchg += 1
            rounds += 1
            if rounds >= self.policy.max_no_xchg_rounds:
                desc = f"no exchange after {rounds} rounds"
                raise OrFailure("NO_XCHG_LIMIT", desc, gaddr, size, key)
            current = found
        self._seen[where] = current
        return current if setting else 0

    async def _backing_off(
        self, gaddr: int, size: int, bits: int, key: int | None, setting: bool, exc: MemopError
    ) -> int:
        """After ``-EAGAIN``: back off exponentially with jitter and retry, within the policy."""
        policy = self.policy
        transient = 0
        while True:
            transient += 1
            self.stats.eagain += 1
            if transient >= policy.eagain_attempts:
                desc = f"-EAGAIN {transient} times"
                raise OrFailure("EAGAIN", desc, gaddr, size, key, exc, errno.EAGAIN) from exc
            delay = min(policy.eagain_backoff_cap, policy.eagain_backoff_base * 2**transient)
            await asyncio.sleep(delay * (0.5 + self._random.random() / 2))
            try:
                return self._loop(gaddr, size, bits, key, setting)
            except TransientError as again:
                exc = again
