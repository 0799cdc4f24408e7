"""A stand-in for the s390x KVM kernel interface, for hosts without one.

:class:`EmulatedKvm` is an :data:`~indicators.memop.kvm.IoctlFn`: it decodes
the real ``struct kvm_s390_mem_op`` at the pointer it is given, validates it
as the kernel of the chosen ABI does (flags, sizes, key, copying the operands
from user memory), performs the access on an :class:`EmulatedBackend`, and
writes results back into the caller's buffers with the kernel's rules for
the old buffer.  It also answers ``KVM_CHECK_EXTENSION`` and records
``KVM_S390_INTERRUPT`` and FLIC attribute calls.

It lets the KVM backend's marshalling run against the same conformance suite
as the emulation, on any host.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from typing import Literal

from .. import abi
from .base import MemopError, ProgramException, TransientError
from .emulated import EmulatedBackend

__all__ = ["EmulatedKvm"]


def _fail(code: int) -> OSError:
    return OSError(code, errno.errorcode.get(code, str(code)))


@dataclass
class EmulatedKvm:
    """An injectable ioctl implementing one cmpxchg ABI on ``backend``."""

    backend: EmulatedBackend
    abi_version: Literal["upstream", "v5"] = "upstream"
    extension: int = (
        abi.KVM_S390_MEMOP_EXTENSION_CAP_BASE | abi.KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG
    )
    interrupts: list[tuple[int, int, int]] = field(default_factory=list)
    device_attrs: list[tuple[int, int, int]] = field(default_factory=list)

    def __call__(self, fd: int, request: int, arg: int) -> int:
        if request == abi.KVM_CHECK_EXTENSION:
            return {
                abi.KVM_CAP_S390_MEM_OP: abi.MEM_OP_MAX_SIZE,
                abi.KVM_CAP_S390_MEM_OP_EXTENSION: self.extension,
                abi.KVM_CAP_S390_SKEYS: 1,
            }.get(arg, 0)
        if request == abi.KVM_S390_MEM_OP:
            return self._mem_op(abi.KvmS390MemOp.from_address(arg))
        if request == abi.KVM_S390_INTERRUPT:
            irq = abi.KvmS390Interrupt.from_address(arg)
            self.interrupts.append((irq.type, irq.parm, irq.parm64))
            return 0
        if request == abi.KVM_SET_DEVICE_ATTR:
            attr = abi.KvmDeviceAttr.from_address(arg)
            self.device_attrs.append((attr.group, attr.attr, attr.addr))
            return 0
        raise _fail(errno.ENOTTY)

    # ------------------------------------------------------------- MEM_OP

    def _mem_op(self, mop: abi.KvmS390MemOp) -> int:
        if self.abi_version == "upstream":
            cmpxchg = mop.op == abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG
        else:
            cmpxchg = bool(mop.flags & abi.KVM_S390_MEMOP_F_CMPXCHG)
        if cmpxchg:
            return self._cmpxchg(mop)
        if mop.op in (abi.KVM_S390_MEMOP_ABSOLUTE_READ, abi.KVM_S390_MEMOP_ABSOLUTE_WRITE):
            return self._absolute(mop)
        raise _fail(errno.EINVAL)

    def _common(self, mop: abi.KvmS390MemOp, supported: int) -> int | None:
        """Flags, size and key checks shared by all VM memops; returns the key."""
        if mop.flags & ~supported or not mop.size:
            raise _fail(errno.EINVAL)
        if mop.size > abi.MEM_OP_MAX_SIZE:
            raise _fail(errno.E2BIG)
        if mop.flags & abi.KVM_S390_MEMOP_F_SKEY_PROTECTION:
            if mop.key > 15:
                raise _fail(errno.EINVAL)
            return int(mop.key)
        return None

    def _cmpxchg(self, mop: abi.KvmS390MemOp) -> int:
        v5 = self.abi_version == "v5"
        supported = abi.KVM_S390_MEMOP_F_SKEY_PROTECTION
        if v5:
            supported |= abi.KVM_S390_MEMOP_F_CMPXCHG | abi.KVM_S390_MEMOP_F_CHECK_ONLY
        key = self._common(mop, supported)
        size = mop.size
        if size > 16 or (v5 and mop.op != abi.KVM_S390_MEMOP_ABSOLUTE_WRITE):
            raise _fail(errno.EINVAL)
        if not mop.buf or not mop.old_addr:
            raise _fail(errno.EFAULT)
        new = int.from_bytes(ctypes.string_at(mop.buf, size), "big")
        old = int.from_bytes(ctypes.string_at(mop.old_addr, size), "big")
        if v5 and mop.flags & abi.KVM_S390_MEMOP_F_CHECK_ONLY:
            return self._check_range(mop, key, store=True)
        try:
            result = self.backend.cmpxchg(mop.gaddr, size, old, new, key)
        except TransientError as exc:
            if not v5:
                ctypes.memmove(mop.old_addr, exc.old.to_bytes(size, "big"), size)
            raise _fail(errno.EAGAIN) from exc
        except ProgramException as exc:
            if not v5:
                ctypes.memmove(mop.old_addr, exc.old.to_bytes(size, "big"), size)
            return exc.code
        except MemopError as exc:
            raise _fail(exc.errno or errno.EINVAL) from exc
        if result.exchanged:
            return 0
        ctypes.memmove(mop.old_addr, result.old.to_bytes(size, "big"), size)
        return abi.KVM_S390_MEMOP_R_NO_XCHG if v5 else 0

    def _absolute(self, mop: abi.KvmS390MemOp) -> int:
        key = self._common(
            mop, abi.KVM_S390_MEMOP_F_SKEY_PROTECTION | abi.KVM_S390_MEMOP_F_CHECK_ONLY
        )
        store = mop.op == abi.KVM_S390_MEMOP_ABSOLUTE_WRITE
        if mop.flags & abi.KVM_S390_MEMOP_F_CHECK_ONLY:
            return self._check_range(mop, key, store=store)
        if not mop.buf:
            raise _fail(errno.EFAULT)
        try:
            if store:
                self.backend.write(mop.gaddr, ctypes.string_at(mop.buf, mop.size), key)
            else:
                ctypes.memmove(mop.buf, self.backend.read(mop.gaddr, mop.size, key), mop.size)
        except ProgramException as exc:
            return exc.code
        except MemopError as exc:
            raise _fail(exc.errno or errno.EINVAL) from exc
        return 0

    def _check_range(self, mop: abi.KvmS390MemOp, key: int | None, *, store: bool) -> int:
        """``F_CHECK_ONLY``: the kernel reads no buffer (``buf`` may be NULL)."""
        try:
            self.backend.check(mop.gaddr, mop.size, key, store=store)
        except ProgramException as exc:
            return exc.code
        except MemopError as exc:
            raise _fail(exc.errno or errno.EINVAL) from exc
        return 0
