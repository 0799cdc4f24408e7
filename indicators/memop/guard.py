"""Write confinement: a backend wrapper that only lets configured bits change.

Whatever a client sends, the daemon may change no guest byte other than the
configured indicator and summary bits.  :class:`ConfinedBackend` enforces that
below the engine: a cmpxchg whose new value differs from its expected value
in any bit outside ``allowed`` (``{gaddr: mask}``), or a write that would
change such a bit, is refused with ``EPERM`` before the inner backend is
touched.  So is every size the guard cannot check: a cmpxchg of any size
but 1, 2, 4, 8 or 16 bytes, a write (or a store check) of 0 or more than
16 bytes.  Reads pass through.  The allowed bits follow the live device
set (:meth:`ConfinedBackend.set_allowed`).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from .base import CmpxchgResult, MemopBackend, MemopError

__all__ = ["ConfinedBackend"]

_CMPXCHG_SIZES = frozenset({1, 2, 4, 8, 16})


class ConfinedBackend(MemopBackend):
    """``inner``, except that only the bits of ``allowed`` may change."""

    def __init__(self, inner: MemopBackend, allowed: Mapping[int, int]) -> None:
        self.inner = inner
        self.allowed = dict(allowed)
        self._images: dict[int, int] = {}  # keyed by gaddr << 5 | size: an int hashes fast

    def set_allowed(self, allowed: Mapping[int, int]) -> None:
        """Follow a changed device set: from now on only the bits of ``allowed`` may change."""
        self.allowed = dict(allowed)
        self._images = {}

    def _image(self, gaddr: int, size: int) -> int:
        """The allowed bits of ``[gaddr, gaddr + size)`` as a big-endian integer."""
        where = gaddr << 5 | size
        image = self._images.get(where)
        if image is None:
            allowed = self.allowed
            image = 0
            for offset in range(size):
                image = image << 8 | allowed.get(gaddr + offset, 0)
            self._images[where] = image
        return image

    @staticmethod
    def _refuse_size(gaddr: int, size: int, key: int | None, what: str, allowed: str) -> None:
        raise MemopError(
            errno.EPERM,
            f"refused: the write guard cannot check a {what} of {size} bytes ({allowed})",
            gaddr=gaddr,
            size=size,
            key=key,
        )

    def _refuse(self, gaddr: int, size: int, key: int | None, outside: int, old: int) -> None:
        raise MemopError(
            errno.EPERM,
            f"refused: would change bits {outside:#x} outside the configured indicator "
            f"and summary bits",
            gaddr=gaddr,
            size=size,
            key=key,
            old=old,
        )

    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        """Forward unless ``old ^ new`` has a bit outside the allowed ones."""
        if size not in _CMPXCHG_SIZES:
            self._refuse_size(gaddr, size, key, "cmpxchg", "1, 2, 4, 8 or 16 bytes")
        image = self._images.get(gaddr << 5 | size)
        if image is None:
            image = self._image(gaddr, size)
        outside = (old ^ new) & ~image
        if outside:
            self._refuse(gaddr, size, key, outside, old)
        return self.inner.cmpxchg(gaddr, size, old, new, key)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        """Reads are not confined."""
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        """Forward only if every byte that would change differs in allowed bits only."""
        if not 0 < len(data) <= 16:
            self._refuse_size(gaddr, len(data), key, "write", "1 to 16 bytes")
        current = self.inner.read(gaddr, len(data), key)
        changed = int.from_bytes(current, "big") ^ int.from_bytes(data, "big")
        outside = changed & ~self._image(gaddr, len(data))
        if outside:
            self._refuse(gaddr, len(data), key, outside, 0)
        self.inner.write(gaddr, data, key)

    @property
    def generation(self) -> str | None:
        """The inner backend's kernel generation."""
        return self.inner.generation

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        """Delegate: a check changes nothing.  A store check of a size this
        guard would refuse to store is refused here too, so that "allowed"
        always means the store itself would be let through."""
        if store and not 0 < size <= 16:
            self._refuse_size(gaddr, size, key, "store", "1 to 16 bytes")
        self.inner.check(gaddr, size, key, store=store)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()
