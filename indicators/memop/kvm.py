"""The real thing: KVM_S390_MEM_OP cmpxchg on a KVM VM file descriptor.

:class:`KvmBackend` speaks both ABIs of the cmpxchg:

- ``upstream`` (Linux 6.3+): op ``ABSOLUTE_CMPXCHG``; the ioctl returns 0
  whether or not it exchanged, and only a changed old buffer says "compare
  failed";
- ``v5`` (the review version in the seed): op ``ABSOLUTE_WRITE`` with
  ``F_CMPXCHG``; a failed compare returns ``KVM_S390_MEMOP_R_NO_XCHG``.

``auto`` asks ``KVM_CHECK_EXTENSION(KVM_CAP_S390_MEM_OP_EXTENSION)`` for the
CAP_CMPXCHG bit, then tells the two apart with a probe that cannot touch
memory: an upstream cmpxchg at an address no guest has answers 5
(addressing), a v5 kernel refuses the unknown op with ``EINVAL``.

``-EINTR`` (the 7.0 fault-in saw a fatal signal, or a signal interrupted
the call) is retried at once, up to :data:`EINTR_ATTEMPTS` calls in all,
then reported as a :class:`MemopError` with errno ``EINTR``; every other
errno is a :class:`MemopError` carrying it.  :attr:`KvmBackend.generation`
says which kernel generation answers (from the release string).

The ioctl itself is injectable: any ``(fd, request, arg) -> int`` callable
that raises :class:`OSError` like the system call does.  The tests pass
:class:`indicators.memop.kernel.EmulatedKvm`, which implements each ABI on an
:class:`EmulatedBackend`, so one contract suite covers this marshalling.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from collections.abc import Callable
from typing import Literal

from .. import abi
from ..errors import IndicatorsError
from .base import (
    CmpxchgResult,
    MemopBackend,
    MemopError,
    ProgramException,
    TransientError,
    check_value,
)
from .generations import Generation, generation_of_release

__all__ = [
    "EINTR_ATTEMPTS",
    "Abi",
    "IoctlFn",
    "KvmBackend",
    "KvmUnavailableError",
    "system_ioctl",
]

Abi = Literal["upstream", "v5", "auto"]

#: ``(fd, request, arg) -> result``; ``arg`` is an int or a pointer as an int.
IoctlFn = Callable[[int, int, int], int]

_PROBE_GADDR = (1 << 64) - 16  # aligned, and no guest has memory there

#: Calls of one memop before ``-EINTR`` is reported (like the engine's bound
#: on ``-EAGAIN``, but immediate: nothing to wait for).
EINTR_ATTEMPTS = 4


class KvmUnavailableError(IndicatorsError, RuntimeError):
    """This host cannot run the KVM backend (not s390x, no /dev/kvm, old kernel)."""


def system_ioctl() -> IoctlFn:
    """The libc ``ioctl`` as an :data:`IoctlFn`: errors become OSError with errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.ioctl
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)

    def call(fd: int, request: int, arg: int) -> int:
        result: int = fn(fd, request, arg)
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result

    return call


class _Operands(threading.local):
    """Per-thread kvm_s390_mem_op plus its old/new/data buffers."""

    def __init__(self) -> None:
        self.mop = abi.KvmS390MemOp()
        self.mop_addr = ctypes.addressof(self.mop)
        self.old = (ctypes.c_uint8 * 16)()
        self.new = (ctypes.c_uint8 * 16)()
        self.old_addr = ctypes.addressof(self.old)
        self.new_addr = ctypes.addressof(self.new)


class KvmBackend(MemopBackend):
    """Memops through ``KVM_S390_MEM_OP`` on ``vm_fd`` (which the backend does not own)."""

    def __init__(
        self,
        vm_fd: int,
        *,
        abi_version: Abi = "auto",
        ioctl: IoctlFn | None = None,
        release: str | None = None,
    ) -> None:
        """``release`` is the kernel release string; by default this host's
        (``uname -r``), or the injected ioctl's ``release`` attribute."""
        if ioctl is None:
            require_s390x_kvm()
            ioctl = system_ioctl()
            if release is None:
                release = os.uname().release
        elif release is None:
            release = getattr(ioctl, "release", None)
        self.release = release
        self._generation = None if release is None else generation_of_release(release)
        #: ``-EINTR`` answers retried so far (each one cost a call).
        self.eintr_retries = 0
        self.vm_fd = vm_fd
        self._ioctl = ioctl
        self._ops = _Operands()
        caps = self._check_extension(abi.KVM_CAP_S390_MEM_OP_EXTENSION)
        if not caps & abi.KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG:
            raise KvmUnavailableError(
                f"the kernel has no storage-key-checked cmpxchg memop "
                f"(KVM_CAP_S390_MEM_OP_EXTENSION = {caps:#x}, needs bit "
                f"{abi.KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG:#x}; Linux 6.3 or later)"
            )
        self.abi: Literal["upstream", "v5"] = (
            self._probe_abi() if abi_version == "auto" else abi_version
        )

    @property
    def generation(self) -> Generation | None:
        """The running kernel's generation from its release, None if unknown."""
        return self._generation

    def _mem_op(self, ops: _Operands, refill: tuple[bytes, bytes] | None = None) -> int:
        """``KVM_S390_MEM_OP`` on ``ops``, retrying ``-EINTR``; OSError otherwise.

        ``refill`` (the old and new operands) is written back into the
        operand buffers before a retry, so that a retried cmpxchg compares
        against what the caller asked for.
        """
        try:
            return self._ioctl(self.vm_fd, abi.KVM_S390_MEM_OP, ops.mop_addr)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
        for attempt in range(2, EINTR_ATTEMPTS + 1):
            self.eintr_retries += 1
            if refill is not None:
                ctypes.memmove(ops.old_addr, refill[0], len(refill[0]))
                ctypes.memmove(ops.new_addr, refill[1], len(refill[1]))
            try:
                return self._ioctl(self.vm_fd, abi.KVM_S390_MEM_OP, ops.mop_addr)
            except OSError as exc:
                if exc.errno != errno.EINTR or attempt == EINTR_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _error(exc: OSError, gaddr: int, size: int, key: int | None, old: int = 0) -> MemopError:
        """The :class:`MemopError` for a failed ioctl (``-EAGAIN`` is the caller's)."""
        code = exc.errno or 0
        reason = os.strerror(code)
        if code == errno.EINTR:
            reason = f"interrupted {EINTR_ATTEMPTS} times in a row (a fatal signal pending?)"
        return MemopError(code, reason, gaddr=gaddr, size=size, key=key, old=old)

    def _check_extension(self, cap: int) -> int:
        try:
            return self._ioctl(self.vm_fd, abi.KVM_CHECK_EXTENSION, cap)
        except OSError as exc:
            raise KvmUnavailableError(f"KVM_CHECK_EXTENSION on fd {self.vm_fd}: {exc}") from exc

    def _probe_abi(self) -> Literal["upstream", "v5"]:
        ops = self._ops
        mop = self._fill(ops, _PROBE_GADDR, 1, abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG, 0, None)
        mop.buf = ops.new_addr
        mop.old_addr = ops.old_addr
        try:
            rc = self._ioctl(self.vm_fd, abi.KVM_S390_MEM_OP, ops.mop_addr)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return "v5"
            raise KvmUnavailableError(f"probing the cmpxchg ABI: {exc}") from exc
        if rc == abi.PGM_ADDRESSING:
            return "upstream"
        raise KvmUnavailableError(f"probing the cmpxchg ABI: unexpected result {rc}")

    # ------------------------------------------------------------- memops

    @staticmethod
    def _fill(
        ops: _Operands, gaddr: int, size: int, op: int, flags: int, key: int | None
    ) -> abi.KvmS390MemOp:
        if not 0 <= gaddr < 1 << 64:
            raise ValueError(f"gaddr {gaddr:#x} is not a 64-bit guest address")
        mop = ops.mop
        mop.gaddr = gaddr
        # Sizes the u32 field cannot hold are refused as the emulation refuses
        # them: a negative one like size 0 (EINVAL), a huge one with E2BIG.
        mop.size = min(max(size, 0), 0xFFFFFFFF)
        mop.op = op
        if key is not None:
            flags |= abi.KVM_S390_MEMOP_F_SKEY_PROTECTION
            # A key that does not fit the u8 field must still be refused as the
            # kernel refuses 16..255, after the size checks: pass 16.
            mop.key = key if 0 <= key <= 0xFF else 16
        else:
            mop.key = 0
        mop.flags = flags
        mop.old_addr = 0
        return mop

    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        """One ``KVM_S390_MEM_OP`` cmpxchg in this backend's ABI."""
        ops = self._ops
        if self.abi == "upstream":
            mop = self._fill(ops, gaddr, size, abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG, 0, key)
        else:
            op, flags = abi.KVM_S390_MEMOP_ABSOLUTE_WRITE, abi.KVM_S390_MEMOP_F_CMPXCHG
            mop = self._fill(ops, gaddr, size, op, flags, key)
        sized = 0 < size <= 16
        refill = None
        if sized:
            check_value("old", old, size)
            check_value("new", new, size)
            refill = (old.to_bytes(size, "big"), new.to_bytes(size, "big"))
            ctypes.memmove(ops.old_addr, refill[0], size)
            ctypes.memmove(ops.new_addr, refill[1], size)
        mop.buf = ops.new_addr
        mop.old_addr = ops.old_addr
        try:
            rc = self._mem_op(ops, refill)
        except OSError as exc:
            # A size the buffers cannot hold never reached them: report ``old``
            # as passed, not what an earlier call left there.
            after = int.from_bytes(bytes(ops.old)[:size], "big") if sized else old
            if exc.errno == errno.EAGAIN:
                raise TransientError(gaddr=gaddr, size=size, key=key, old=after) from exc
            raise self._error(exc, gaddr, size, key, after) from exc
        after = int.from_bytes(bytes(ops.old)[:size], "big") if sized else old
        if rc == 0:
            if self.abi == "v5":
                return CmpxchgResult(True, old)
            return CmpxchgResult(after == old, after)
        if rc == abi.KVM_S390_MEMOP_R_NO_XCHG and self.abi == "v5":
            return CmpxchgResult(False, after)
        raise ProgramException(rc, gaddr=gaddr, size=size, key=key, old=after)

    def _access(
        self, gaddr: int, buffer: ctypes.Array[ctypes.c_char], op: int, key: int | None
    ) -> None:
        ops = self._ops
        size = len(buffer)
        mop = self._fill(ops, gaddr, size, op, 0, key)
        mop.buf = ctypes.addressof(buffer)
        self._run_plain(ops, gaddr, size, key)

    def _run_plain(self, ops: _Operands, gaddr: int, size: int, key: int | None) -> None:
        """Issue a filled read/write/check memop; a non-zero return is a program exception."""
        try:
            rc = self._mem_op(ops)
        except OSError as exc:
            raise self._error(exc, gaddr, size, key) from exc
        if rc:
            raise ProgramException(rc, gaddr=gaddr, size=size, key=key, old=0)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        """``KVM_S390_MEMOP_ABSOLUTE_READ``."""
        buffer = ctypes.create_string_buffer(max(size, 0))
        self._access(gaddr, buffer, abi.KVM_S390_MEMOP_ABSOLUTE_READ, key)
        return buffer.raw[:size]

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        """``KVM_S390_MEMOP_ABSOLUTE_WRITE``."""
        buffer = ctypes.create_string_buffer(bytes(data), len(data))
        self._access(gaddr, buffer, abi.KVM_S390_MEMOP_ABSOLUTE_WRITE, key)

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        """``ABSOLUTE_WRITE``/``ABSOLUTE_READ`` with ``F_CHECK_ONLY`` and no buffer."""
        op = abi.KVM_S390_MEMOP_ABSOLUTE_WRITE if store else abi.KVM_S390_MEMOP_ABSOLUTE_READ
        ops = self._ops
        mop = self._fill(ops, gaddr, size, op, abi.KVM_S390_MEMOP_F_CHECK_ONLY, key)
        mop.buf = 0  # the kernel copies nothing for a check
        self._run_plain(ops, gaddr, size, key)

    # ----------------------------------------------------------- interrupts

    def inject_adapter_interrupt(self, isc: int) -> None:
        """``KVM_S390_INTERRUPT`` of an adapter interrupt for ``isc`` on the VM fd."""
        irq = abi.adapter_interrupt(isc)
        self._ioctl(self.vm_fd, abi.KVM_S390_INTERRUPT, ctypes.addressof(irq))

    def flic_set_attr(self, flic_fd: int, group: int, attr: int, addr: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR`` on the FLIC device (AIRQ_INJECT, AISM, AISM_ALL)."""
        arg = abi.KvmDeviceAttr(flags=0, group=group, attr=attr, addr=addr)
        self._ioctl(flic_fd, abi.KVM_SET_DEVICE_ATTR, ctypes.addressof(arg))


def require_s390x_kvm() -> None:
    """Raise :class:`KvmUnavailableError` unless this host is s390x with /dev/kvm."""
    machine = platform.machine()
    if machine != "s390x":
        raise KvmUnavailableError(
            f"the KVM backend needs an s390x host with KVM; this host is {machine}: "
            f"use the emulated backend"
        )
    if not os.path.exists("/dev/kvm"):
        raise KvmUnavailableError("the KVM backend needs /dev/kvm, which this host lacks")
