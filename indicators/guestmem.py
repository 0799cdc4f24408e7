"""Guest absolute memory, mapped into this process, with hardware atomics.

:class:`GuestMemory` maps a guest's RAM: anonymous memory for a pure
emulation, or a file (a QEMU ``memory-backend-file,share=on`` RAM file, or a
``/proc/PID/fd/N`` link to a memfd) so that this process and a running guest
see the same bytes.  Guest absolute address ``gaddr`` is the offset in the
mapping (QEMU s390x has one RAM block at 0).

Compare-and-exchange goes through libatomic's generic
``__atomic_compare_exchange``, which for naturally aligned 1/2/4/8/16-byte
operands is the CPU's own interlocked instruction (``lock cmpxchg``,
``cmpxchg16b`` on x86_64), so it interleaves correctly with the guest's CS,
CSG and CDSG and with other processes on the same file.  Values cross this
API as unsigned big-endian integers, as the guest stores them.

    with GuestMemory(1 << 20) as mem:
        ok, seen = mem.cas(0x1000, 1, 0x00, 0x80)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct
import threading
from types import TracebackType

__all__ = ["CAS_SIZES", "GuestMemory", "libatomic"]

CAS_SIZES = (1, 2, 4, 8, 16)

_SEQ_CST = 5
_FORMATS = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}


def libatomic() -> ctypes.CDLL:
    """Load libatomic (Debian: libatomic1) once; raise OSError naming it if absent."""
    global _LIBATOMIC
    if _LIBATOMIC is None:
        name = ctypes.util.find_library("atomic") or "libatomic.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise OSError(f"libatomic is needed for guest-memory atomics: {exc}") from exc
        fn = lib.__atomic_compare_exchange
        fn.restype = ctypes.c_bool
        fn.argtypes = (
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        )
        load = lib.__atomic_load
        load.restype = None
        load.argtypes = (ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
        _LIBATOMIC = lib
    return _LIBATOMIC


_LIBATOMIC: ctypes.CDLL | None = None


class _Scratch(threading.local):
    """Per-thread operand buffers: 'expected' and 'desired', 16-byte aligned."""

    def __init__(self) -> None:
        self.raw = ctypes.create_string_buffer(64)
        base = ctypes.addressof(self.raw)
        self.off = (-base) % 16
        self.exp = base + self.off
        self.new = self.exp + 16
        self.view = memoryview(self.raw).cast("B")


class GuestMemory:
    """A mapping of guest absolute memory with big-endian atomic operations.

    ``size`` is the guest's memory size in bytes (a multiple of 4 KiB).
    ``path`` maps that file shared (created and sized if ``create``);
    without it the memory is anonymous and private to this process tree.
    """

    def __init__(self, size: int, path: str | None = None, *, create: bool = False) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"memory size {size:#x} is not a positive multiple of the page size")
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
        lib = libatomic()
        self._cas = getattr(
            lib, "__atomic_compare_exchange"
        )  # a plain attribute would be name-mangled
        self._load = getattr(lib, "__atomic_load")
        self._tls = _Scratch()

    # ---------------------------------------------------------- atomics

    def cas(self, gaddr: int, size: int, expected: int, desired: int) -> tuple[bool, int]:
        """Atomically replace ``expected`` by ``desired`` at ``gaddr``.

        Returns ``(exchanged, seen)``: ``seen`` is the value found, equal to
        ``expected`` when the exchange happened.  The caller guarantees a
        natural alignment and a size in :data:`CAS_SIZES` inside the mapping.
        """
        tls = self._tls
        view = tls.view
        off = tls.off
        if size == 16:
            view[off : off + 16] = expected.to_bytes(16, "big")
            view[off + 16 : off + 32] = desired.to_bytes(16, "big")
        else:
            fmt = _FORMATS[size]
            struct.pack_into(fmt, view, off, expected)
            struct.pack_into(fmt, view, off + 16, desired)
        if self._cas(size, self.base + gaddr, tls.exp, tls.new, _SEQ_CST, _SEQ_CST):
            return True, expected
        return False, int.from_bytes(view[off : off + size], "big")

    def load(self, gaddr: int, size: int) -> int:
        """Atomically load a naturally aligned 1/2/4/8/16-byte value."""
        tls = self._tls
        self._load(size, self.base + gaddr, tls.exp, _SEQ_CST)
        return int.from_bytes(tls.view[tls.off : tls.off + size], "big")

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
