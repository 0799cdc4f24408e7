"""The memop backend interface: a key-checked cmpxchg on guest absolute memory.

Every backend answers the same three calls with the outcomes of the kernel's
``KVM_S390_MEM_OP`` (see ``shared/spec/memop-cmpxchg.md``):

- :meth:`MemopBackend.cmpxchg` returns a :class:`CmpxchgResult` when the
  operation ran (exchanged or compare failed) and raises a
  :class:`MemopError` otherwise: :class:`ProgramException` for a program
  interruption code (4 protection, 5 addressing), :class:`TransientError`
  for ``-EAGAIN`` (retry), a plain :class:`MemopError` for any other errno.
- :meth:`MemopBackend.read` and :meth:`MemopBackend.write` are absolute
  accesses under the same key rules;
- :meth:`MemopBackend.check` asks, without accessing anything, whether a
  store or fetch would be allowed (``ABSOLUTE_WRITE``/``ABSOLUTE_READ`` with
  ``KVM_S390_MEMOP_F_CHECK_ONLY``).

``key=None`` means "no ``F_SKEY_PROTECTION``" (the kernel then uses key 0,
which matches every storage key).  Values are unsigned big-endian integers of
``size`` bytes; one that does not fit raises :class:`ValueError` before the
backend touches anything.
"""

from __future__ import annotations

import errno as _errno
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar, NamedTuple

__all__ = [
    "CmpxchgResult",
    "MemopBackend",
    "MemopError",
    "ProgramException",
    "TransientError",
    "check_value",
]


class CmpxchgResult(NamedTuple):
    """What a cmpxchg that ran found: ``old`` equals the expected value when exchanged."""

    exchanged: bool
    old: int


class MemopError(Exception):
    """A memop that did not run.

    ``errno`` is the kernel's error number (``None`` for a program exception),
    ``old`` the value the kernel leaves in the caller's old buffer, and
    ``gaddr``, ``size`` and ``key`` say which access failed.
    """

    def __init__(
        self,
        errno: int | None,
        reason: str,
        *,
        gaddr: int,
        size: int,
        key: int | None,
        old: int = 0,
    ) -> None:
        self.errno = errno
        self.reason = reason
        self.gaddr = gaddr
        self.size = size
        self.key = key
        self.old = old
        super().__init__(self._text())

    def _text(self) -> str:
        code = _errno.errorcode.get(self.errno or 0, str(self.errno))
        key = "none" if self.key is None else str(self.key)
        return f"{code}: {self.reason} (gaddr {self.gaddr:#x}, size {self.size}, key {key})"


class TransientError(MemopError):
    """``-EAGAIN``: a 1- or 2-byte cmpxchg lost 128 rounds to neighbouring bytes; retry."""

    def __init__(self, *, gaddr: int, size: int, key: int | None, old: int) -> None:
        super().__init__(
            _errno.EAGAIN,
            "neighbouring bytes kept changing",
            gaddr=gaddr,
            size=size,
            key=key,
            old=old,
        )


class ProgramException(MemopError):
    """The access raised a program interruption: ``code`` 4 (protection) or 5 (addressing)."""

    NAMES: ClassVar[dict[int, str]] = {4: "protection", 5: "addressing"}

    def __init__(self, code: int, *, gaddr: int, size: int, key: int | None, old: int) -> None:
        self.code = code
        super().__init__(
            None,
            f"program exception {code} ({self.NAMES.get(code, 'unknown')})",
            gaddr=gaddr,
            size=size,
            key=key,
            old=old,
        )

    def _text(self) -> str:
        key = "none" if self.key is None else str(self.key)
        return f"{self.reason} (gaddr {self.gaddr:#x}, size {self.size}, key {key})"


def check_value(name: str, value: int, size: int) -> None:
    """Raise ValueError unless ``value`` is an unsigned integer of ``size`` bytes."""
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{name} value {value:#x} does not fit in {size} bytes")


class MemopBackend(ABC):
    """One guest's absolute memory, reached the way KVM_S390_MEM_OP reaches it."""

    @abstractmethod
    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        """Store ``new`` at ``gaddr`` if it holds ``old``, atomically and key-checked."""

    @abstractmethod
    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        """Absolute, key-checked fetch of ``size`` bytes."""

    @abstractmethod
    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        """Absolute, key-checked store of ``data``."""

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        """Whether a store (or, with ``store=False``, a fetch) of ``size`` bytes would pass.

        Changes neither memory nor the storage keys' R and C bits.  Returns
        when the access would be allowed; raises what the kernel's
        ``ABSOLUTE_WRITE``/``ABSOLUTE_READ`` with ``F_CHECK_ONLY`` reports:
        :class:`ProgramException` 4 (protection) or 5 (addressing), or a
        :class:`MemopError` with the errno (``EINVAL`` for size 0 or a key
        over 15, ``E2BIG`` for a size over 65536).

        The kernel's check is narrower than the access itself, and backends
        reproduce that: addressing is checked on the first byte, and only a
        non-zero ``key`` makes it look at every page (each page outside
        memory, or in a read-only memslot, is then addressing; a key
        mismatch is protection for a store, and for a fetch only on a
        fetch-protected page).  With ``key`` None or 0 a range that runs
        past the end of memory or over a read-only memslot checks as allowed.

        Every backend of this package implements it; the default (kept
        concrete so that test doubles need not) raises NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot check an access")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the backend holds.  Idempotent."""

    def __enter__(self) -> MemopBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
