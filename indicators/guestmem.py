"""Guest absolute memory, mapped into this process, with hardware atomics.

:class:`GuestMemory` maps a guest's RAM: anonymous memory for a pure
emulation, or a file (a QEMU ``memory-backend-file,share=on`` RAM file, or a
``/proc/PID/fd/N`` link to a memfd) so that this process and a running guest
see the same bytes.  Guest absolute address ``gaddr`` is the offset in the
mapping (QEMU s390x has one RAM block at 0).

Compare-and-exchange goes through libatomic (``__atomic_compare_exchange_N``,
and the generic ``__atomic_compare_exchange`` for 16 bytes), which for
naturally aligned 1/2/4/8/16-byte operands is the CPU's own interlocked
instruction (``lock cmpxchg``, ``cmpxchg16b`` on x86_64), so it interleaves
correctly with the guest's CS, CSG and CDSG and with other processes on the
same file.  Values cross this
API as unsigned big-endian integers, as the guest stores them.

Each thread gets its own compare-and-swap and load functions, one per size,
holding ready-made ctypes arguments (:class:`ThreadAtomics`); a hot path
such as the emulated memop backend takes them from :attr:`GuestMemory.atomics`
directly and saves a method call.

    with GuestMemory(1 << 20) as mem:
        ok, seen = mem.cas(0x1000, 1, 0x00, 0x80)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["CAS_SIZES", "CasFn", "GuestMemory", "LoadFn", "ThreadAtomics", "libatomic"]

CAS_SIZES = (1, 2, 4, 8, 16)

_SEQ_CST = 5
# ctypes types whose ``.value`` reads and writes big-endian bytes.
_BIG_ENDIAN: dict[int, type[ctypes._SimpleCData[int]]] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16.__ctype_be__,
    4: ctypes.c_uint32.__ctype_be__,
    8: ctypes.c_uint64.__ctype_be__,
}
_NATIVE: dict[int, type[ctypes._SimpleCData[int]]] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16,
    4: ctypes.c_uint32,
    8: ctypes.c_uint64,
}

#: ``(gaddr, expected, desired) -> (exchanged, seen)`` for one size.
CasFn = Callable[[int, int, int], tuple[bool, int]]
#: ``(gaddr) -> value`` for one size.
LoadFn = Callable[[int], int]


def libatomic() -> ctypes.PyDLL:
    """Load libatomic (Debian: libatomic1) once; raise OSError naming it if absent.

    It is loaded as a :class:`ctypes.PyDLL`: a compare-and-swap takes
    nanoseconds, so keeping the GIL across the call is cheaper than dropping
    and retaking it.  The functions get no ``argtypes``: callers pass
    ready-made ctypes objects, which skips a conversion per argument.
    """
    global _LIBATOMIC
    if _LIBATOMIC is None:
        name = ctypes.util.find_library("atomic") or "libatomic.so.1"
        try:
            lib = ctypes.PyDLL(name)
        except OSError as exc:
            raise OSError(f"libatomic is needed for guest-memory atomics: {exc}") from exc
        for size in (1, 2, 4, 8):
            getattr(lib, f"__atomic_compare_exchange_{size}").restype = ctypes.c_bool
        getattr(lib, "__atomic_compare_exchange").restype = ctypes.c_bool
        getattr(lib, "__atomic_load").restype = None
        _LIBATOMIC = lib
    return _LIBATOMIC


_LIBATOMIC: ctypes.PyDLL | None = None


def _scratch() -> tuple[ctypes.Array[ctypes.c_char], int]:
    """A scratch buffer and the offset of two 16-byte aligned slots in it."""
    raw = ctypes.create_string_buffer(64)
    return raw, -ctypes.addressof(raw) % 16


def _make_cas(base: int, size: int) -> CasFn:
    """A compare-and-swap of ``size`` bytes that owns its argument objects.

    Its scratch ('expected', written back by a failed CAS, and 'desired') is
    private, so each thread needs its own: see :class:`ThreadAtomics`.
    """
    raw, off = _scratch()
    address = ctypes.c_size_t()
    if size == 16:
        return _make_cas16(base, raw, off, address)
    cas = getattr(libatomic(), f"__atomic_compare_exchange_{size}")
    # Big-endian views: assigning .value stores the guest's byte order, and
    # reading 'expected' after a failed CAS yields the value found.  The CAS
    # takes 'desired' by value: a native view of the same bytes passes them
    # unchanged, so the byte swap happens in ctypes, not in Python.
    kind = _BIG_ENDIAN[size]
    old = kind.from_buffer(raw, off)
    new = kind.from_buffer(raw, off + 16)
    new_as_passed = _NATIVE[size].from_buffer(raw, off + 16)
    old_ref = ctypes.byref(old)

    def cas_n(gaddr: int, expected: int, desired: int) -> tuple[bool, int]:
        address.value = base + gaddr
        old.value = expected
        new.value = desired
        if cas(address, old_ref, new_as_passed, _SEQ_CST, _SEQ_CST):
            return True, expected
        return False, old.value

    return cas_n


def _make_cas16(
    base: int, raw: ctypes.Array[ctypes.c_char], off: int, address: ctypes.c_size_t
) -> CasFn:
    """The 16-byte CAS: ctypes has no 128-bit integer, so the generic call with pointers."""
    cas = getattr(libatomic(), "__atomic_compare_exchange")
    count = ctypes.c_size_t(16)
    view = memoryview(raw).cast("B")
    expected_ref, desired_ref = ctypes.byref(raw, off), ctypes.byref(raw, off + 16)

    def cas16(gaddr: int, expected: int, desired: int) -> tuple[bool, int]:
        address.value = base + gaddr
        view[off : off + 16] = expected.to_bytes(16, "big")
        view[off + 16 : off + 32] = desired.to_bytes(16, "big")
        if cas(count, address, expected_ref, desired_ref, _SEQ_CST, _SEQ_CST):
            return True, expected
        return False, int.from_bytes(view[off : off + 16], "big")

    return cas16


def _make_load(base: int, size: int) -> LoadFn:
    """An atomic load of ``size`` bytes that owns its argument objects."""
    load = getattr(libatomic(), "__atomic_load")
    raw, off = _scratch()
    count = ctypes.c_size_t(size)
    address = ctypes.c_size_t()
    if size == 16:
        view = memoryview(raw).cast("B")
        result_ref = ctypes.byref(raw, off)

        def load16(gaddr: int) -> int:
            address.value = base + gaddr
            load(count, address, result_ref, _SEQ_CST)
            return int.from_bytes(view[off : off + 16], "big")

        return load16

    result = _BIG_ENDIAN[size].from_buffer(raw, off)
    ref = ctypes.byref(result)

    def load_n(gaddr: int) -> int:
        address.value = base + gaddr
        load(count, address, ref, _SEQ_CST)
        return int(result.value)

    return load_n


class ThreadAtomics(threading.local):
    """The calling thread's atomics on one mapping, one function per size.

    ``cas[size](gaddr, expected, desired) -> (exchanged, seen)`` and
    ``load[size](gaddr) -> value``, with the contract of
    :meth:`GuestMemory.cas` and :meth:`GuestMemory.load`.  Each thread that
    touches the attributes gets its own functions (and scratch buffers);
    hot paths fetch them here to skip a method call.
    """

    def __init__(self, base: int) -> None:
        self.cas: dict[int, CasFn] = {size: _make_cas(base, size) for size in CAS_SIZES}
        self.load: dict[int, LoadFn] = {size: _make_load(base, size) for size in CAS_SIZES}


class _Unmapped:
    """Stands in for :class:`ThreadAtomics` after close: no access to a stale address."""

    def __getattr__(self, name: str) -> Any:
        raise ValueError("guest memory is closed")


class GuestMemory:
    """A mapping of guest absolute memory with big-endian atomic operations.

    ``size`` is the guest's memory size in bytes (a multiple of 4 KiB).
    ``path`` maps that file shared (created and sized if ``create``);
    without it the memory is anonymous and private to this process tree.
    """

    def __init__(self, size: int, path: str | None = None, *, create: bool = False) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"memory size {size:#x} is not a positive multiple of the page size")
        if size > sys.maxsize:  # mmap takes a ssize_t: an OverflowError otherwise
            raise OSError(errno.ENOMEM, f"{size:#x} bytes are more than this host can map")
        self.size = size
        self.path = path
        if path is None:
            self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        else:
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o600)
            try:
                actual = os.fstat(fd).st_size
                if actual < size:
                    if not create:
                        raise ValueError(
                            f"RAM file {path} has {actual:#x} bytes, fewer than {size:#x}"
                        )
                    os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self._mmap)
        self.base = ctypes.addressof(self._anchor)
        self._view = memoryview(self._mmap)
        #: The calling thread's atomics (see :class:`ThreadAtomics`).
        self.atomics: ThreadAtomics | _Unmapped = ThreadAtomics(self.base)

    # ---------------------------------------------------------- atomics

    def cas(self, gaddr: int, size: int, expected: int, desired: int) -> tuple[bool, int]:
        """Atomically replace ``expected`` by ``desired`` at ``gaddr``.

        Returns ``(exchanged, seen)``: ``seen`` is the value found, equal to
        ``expected`` when the exchange happened.  The caller guarantees a
        natural alignment and a size in :data:`CAS_SIZES` inside the mapping.
        """
        return self.atomics.cas[size](gaddr, expected, desired)

    def load(self, gaddr: int, size: int) -> int:
        """Atomically load a naturally aligned 1/2/4/8/16-byte value."""
        return self.atomics.load[size](gaddr)

    # ------------------------------------------------------- plain access

    def read(self, gaddr: int, size: int) -> bytes:
        """Copy ``size`` bytes out (not atomic as a whole)."""
        return bytes(self._view[gaddr : gaddr + size])

    def write(self, gaddr: int, data: bytes) -> None:
        """Copy ``data`` in (not atomic as a whole)."""
        self._view[gaddr : gaddr + len(data)] = data

    def snapshot(self) -> bytes:
        """A copy of the whole memory."""
        return bytes(self._view)

    # ----------------------------------------------------------- lifetime

    def close(self) -> None:
        """Unmap.  Idempotent."""
        if self._mmap.closed:
            return
        self.atomics = _Unmapped()
        self._view.release()
        del self._anchor
        self._mmap.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._mmap.closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
