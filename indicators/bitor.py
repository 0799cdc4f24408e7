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
them.  Counts go to the engine's :class:`~indicators.stats.EngineStats`.
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


class OrFailure(Exception):
    """An OR that could not be done: ``code`` (a program interruption code, an errno
    name, ``NO_XCHG_LIMIT``), what happened, where, and the backend's error."""

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


def errno_name(number: int | None) -> str:
    """``EAGAIN`` for 11, and so on."""
    return errno.errorcode.get(number or 0, str(number))


def window_image(gaddr: int, mask: int) -> tuple[int, int]:
    """The 16-byte window holding ``gaddr`` and ``mask`` placed in its 128-bit image."""
    return gaddr & ~15, mask << ((15 - (gaddr & 15)) << 3)


class BitSetter:
    """ORs bits through ``backend`` under ``policy``, counting into ``stats``."""

    def __init__(self, backend: MemopBackend, policy: RetryPolicy, stats: EngineStats) -> None:
        self.backend = backend
        self.policy = policy
        self.stats = stats
        self._random = random.Random()
        # The last value seen per (gaddr, size): the next cmpxchg's guess.
        self._seen: dict[tuple[int, int], int] = {}

    async def or_window(self, window: int, mask: int, key: int | None) -> int:
        """OR ``mask`` (a 128-bit big-endian image of the window) with one cmpxchg
        of the smallest aligned size covering its bytes; return the window's old image."""
        first = 15 - ((mask.bit_length() - 1) >> 3)
        last = 15 - (((mask & -mask).bit_length() - 1) >> 3)
        for size in _SIZES:
            if first // size == last // size:
                break
        start = first - first % size
        shift = (16 - start - size) << 3
        old = await self.or_bits(window + start, size, mask >> shift, key)
        return old << shift

    async def or_bits(self, gaddr: int, size: int, bits: int, key: int | None) -> int:
        """The cmpxchg retry loop; returns the value found before the OR.

        The first guess is the last value seen here without ``bits``: right
        when the guest consumed our bits since, and when they are still set
        the compare fails and shows it, so nothing is written.
        """
        backend, stats, policy = self.backend, self.stats, self.policy
        where = (gaddr, size)
        current = self._seen.get(where, 0) & ~bits
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
                    raise OrFailure("EAGAIN", desc, gaddr, size, key, exc) from exc
                delay = min(policy.eagain_backoff_cap, policy.eagain_backoff_base * 2**transient)
                await asyncio.sleep(delay * (0.5 + self._random.random() / 2))
                continue
            except ProgramException as exc:
                raise OrFailure(str(exc.code), exc.reason, gaddr, size, key, exc) from exc
            except MemopError as exc:
                raise OrFailure(errno_name(exc.errno), exc.reason, gaddr, size, key, exc) from exc
            if result.exchanged:
                self._seen[where] = current | bits
                return current
            stats.no_xchg += 1
            rounds += 1
            if rounds >= policy.max_no_xchg_rounds:
                desc = f"no exchange after {rounds} rounds"
                raise OrFailure("NO_XCHG_LIMIT", desc, gaddr, size, key)
            current = result.old
        self._seen[where] = current
        return current
