"""Memop backends: a storage-key-checked cmpxchg on guest absolute memory.

One interface (:class:`MemopBackend`), two implementations:

- :class:`EmulatedBackend`: the upstream semantics of either kernel
  generation (6.3-6.19 or 7.0+, see :mod:`.generations`) over a mapping of
  guest RAM (anonymous, or a real QEMU guest's shared RAM file), with
  storage keys and an opt-in :class:`FaultInjector`;
- :class:`KvmBackend`: the real ``KVM_S390_MEM_OP`` ioctl on a VM fd, in the
  upstream or the v5 ABI.

    from indicators.memop import EmulatedBackend

    with EmulatedBackend(1 << 20) as mem:
        result = mem.cmpxchg(0x1000, 1, 0x00, 0x80, key=3)
        assert result.exchanged
"""

from .base import CmpxchgResult, MemopBackend, MemopError, ProgramException, TransientError
from .emulated import EmulatedBackend
from .faults import FaultInjector
from .generations import GENERATIONS, Generation
from .kvm import KvmBackend, KvmUnavailableError

__all__ = [
    "GENERATIONS",
    "CmpxchgResult",
    "EmulatedBackend",
    "FaultInjector",
    "Generation",
    "KvmBackend",
    "KvmUnavailableError",
    "MemopBackend",
    "MemopError",
    "ProgramException",
    "TransientError",
]
