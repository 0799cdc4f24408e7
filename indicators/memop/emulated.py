"""An exact emulation of the KVM_S390_MEM_OP cmpxchg on mapped memory, per kernel generation.

:class:`EmulatedBackend` runs the kernel's validation steps in the kernel's
order, keeps one storage key per 4 KiB page (ACC, F, R, C), and performs the
exchange with a real hardware compare-and-swap on a :class:`GuestMemory`
mapping, so a real guest sharing that RAM, other threads and other processes
all see correct atomics.  Sizes 1 and 2 are done as the kernel does them: CS
on the containing aligned 4-byte word, retried while only neighbouring bytes
changed, ``-EAGAIN`` after 128 such rounds.

``kernel`` picks the generation (:mod:`.generations`): ``"6.3"`` (Linux 6.3
to 6.19, the default) checks the memslot of ``gaddr`` before anything else
(program exception 5 first), ``"7.0"`` refuses a size over 16 or an address
that fails the ``IS_ALIGNED`` mask test first and then faults the page in,
which can also fail with ``-EINTR``, ``-ENOMEM`` or ``-EFAULT`` (only
through the :class:`FaultInjector` here).  Everything else is common.

Deliberate differences from a kernel (none of them visible through the
cmpxchg):

- a multi-page :meth:`EmulatedBackend.write` checks every page before
  storing anything, where the kernel may store the pages before a faulting
  one;
- host stores through the mapping by other parties do not set R and C (they
  do not on a real QEMU guest either).

A :class:`FaultInjector` can add ``-EAGAIN`` at random, force protection
on address ranges and fail the 7.0 fault-in, for tests and demonstrations.
"""

from __future__ import annotations

import errno
import os

from ..abi import (
    MEM_OP_MAX_SIZE,
    PAGE_SHIFT,
    PGM_ADDRESSING,
    PGM_PROTECTION,
    SKEY_ACC_MASK,
    SKEY_C,
    SKEY_FP,
    SKEY_R,
    SKEY_RESERVED,
)
from ..guestmem import GuestMemory
from .base import (
    CmpxchgResult,
    MemopBackend,
    MemopError,
    ProgramException,
    TransientError,
    check_value,
)
from .faults import FaultInjector
from .generations import Generation, check_generation

__all__ = ["EmulatedBackend", "FaultInjector"]

#: Rounds a 1- or 2-byte cmpxchg retries while only neighbouring bytes change.
MAX_NEIGHBOUR_ROUNDS = 128

_RC = SKEY_R | SKEY_C

#: Exclusive upper bound of an operand, for each size a cmpxchg can have.
_VALUE_LIMITS = {size: 1 << (size << 3) for size in (1, 2, 4, 8, 16)}

# Builds the result tuple without NamedTuple's Python-level __new__ (hot path).
_new_result = tuple.__new__


class EmulatedBackend(MemopBackend):
    """Guest absolute memory with the upstream cmpxchg semantics and storage keys.

    ``memory_size`` bytes, anonymous unless ``path`` names a RAM file (created
    when it does not exist).  Every page starts with storage key 0.
    ``kernel`` is the generation whose outcomes to reproduce.
    """

    def __init__(
        self,
        memory_size: int,
        *,
        path: str | None = None,
        faults: FaultInjector | None = None,
        kernel: Generation = "6.3",
    ) -> None:
        self.kernel: Generation = check_generation(kernel)
        create = path is not None and not os.path.exists(path)
        self.memory = GuestMemory(memory_size, path, create=create)
        self.memory_size = memory_size
        self.faults = faults
        self._keys = bytearray(memory_size >> PAGE_SHIFT)
        self._readonly: set[int] = set()

    @property
    def generation(self) -> Generation:
        """The kernel generation this emulation reproduces (``kernel``)."""
        return self.kernel

    # ------------------------------------------------------------ storage keys

    def set_storage_key(self, gaddr: int, key: int) -> None:
        """Set the storage key byte of the page holding ``gaddr`` (as SSKE would)."""
        page = self._page(gaddr)
        if not 0 <= key <= 0xFF or key & SKEY_RESERVED:
            raise ValueError(f"storage key {key:#x} for gaddr {gaddr:#x} is not a valid key byte")
        self._keys[page] = key

    def get_storage_key(self, gaddr: int) -> int:
        """The storage key byte (ACC | F | R | C) of the page holding ``gaddr``."""
        return self._keys[self._page(gaddr)]

    def set_readonly(self, gaddr: int, size: int, readonly: bool = True) -> None:
        """Mark the pages of ``[gaddr, gaddr + size)`` as a read-only memslot."""
        pages = range(self._page(gaddr), self._page(gaddr + size - 1) + 1)
        if readonly:
            self._readonly.update(pages)
        else:
            self._readonly.difference_update(pages)

    def _page(self, gaddr: int) -> int:
        if not 0 <= gaddr < self.memory_size:
            raise ValueError(f"gaddr {gaddr:#x} is outside guest memory ({self.memory_size:#x})")
        return gaddr >> PAGE_SHIFT

    # ----------------------------------------------------------------- cmpxchg

    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        """The upstream cmpxchg: the kernel's checks in the kernel's order, then CS.

        The guard below is a cheap test that every check would pass; anything
        unusual (an error, a read-only memslot, injected faults) goes through
        :meth:`_validate`, which runs the steps one by one and raises what the
        kernel reports.
        """
        limit = _VALUE_LIMITS.get(size)
        keys = self._keys
        if (
            limit is None
            or not 0 <= old < limit
            or not 0 <= new < limit
            or not 0 <= gaddr < self.memory_size
            or gaddr & (size - 1)
            or self._readonly
            or self.faults is not None
            or (key and keys[gaddr >> PAGE_SHIFT] >> 4 != key)
        ):
            self._validate(gaddr, size, old, new, key)
        # Step 6: the exchange, under the (now checked) access key.
        page = gaddr >> PAGE_SHIFT
        skey = keys[page]
        if size >= 4:
            exchanged, seen = self.memory.atomics.cas[size](gaddr, old, new)
        else:
            exchanged, seen = self._cas_in_word(gaddr, size, old, new, key)
        # A successful store sets R and C; a failed compare was a fetch: R.
        if exchanged:
            if skey & _RC != _RC:
                keys[page] = skey | _RC
        elif not skey & SKEY_R:
            keys[page] = skey | SKEY_R
        return _new_result(CmpxchgResult, (exchanged, seen))

    def _validate(self, gaddr: int, size: int, old: int, new: int, key: int | None) -> None:
        """Every check before the exchange, in the order of the chosen generation.

        Returns if the exchange may run; raises what the kernel reports.
        Steps 1-3 (``mem_op_validate_common``, size over 16, copying the
        operands in) are the same in both generations.
        """
        # What the ABI cannot carry is the caller's bug: ValueError, before the kernel.
        if not 0 <= gaddr < 1 << 64:
            raise ValueError(f"gaddr {gaddr:#x} is not a 64-bit guest address")
        if 0 < size <= 16:
            check_value("old", old, size)
            check_value("new", new, size)
        _check_size_and_key(gaddr, size, key, old)
        if size > 16:
            raise MemopError(
                errno.EINVAL, "cmpxchg size over 16", gaddr=gaddr, size=size, key=key, old=old
            )
        if self.kernel == "6.3":
            # kvm_s390_vm_mem_op_cmpxchg checks the memslot of gaddr first...
            self._check_backed(gaddr, size, key, old)
            # ...then cmpxchg_guest_abs_with_key the IS_ALIGNED mask test.
            self._check_mask_aligned(gaddr, size, key, old)
        else:
            # cmpxchg_guest_abs_with_key: `len > 16 || !IS_ALIGNED(gpa, len)` first,
            # then kvm_s390_faultin_gfn: no memslot, read-only, host errors.
            self._check_mask_aligned(gaddr, size, key, old)
            self._check_backed(gaddr, size, key, old)
        page = gaddr >> PAGE_SHIFT
        if page in self._readonly:
            raise MemopError(
                errno.EOPNOTSUPP, "read-only memslot", gaddr=gaddr, size=size, key=key, old=old
            )
        faults = self.faults
        if self.kernel == "7.0" and faults is not None:
            code = faults.faultin()
            if code is not None:
                reason = _FAULTIN_REASONS[code]
                raise MemopError(code, reason, gaddr=gaddr, size=size, key=key, old=old)
        # The exchange's `switch (len)`: its default refuses a size that passed
        # the mask test but is not a power of two.
        if size & (size - 1):
            raise MemopError(
                errno.EINVAL, "size not 1/2/4/8/16", gaddr=gaddr, size=size, key=key, old=old
            )
        # A cmpxchg is a store; a non-zero key must equal ACC.  The kernel
        # zeroes the old buffer on a protection exception.
        if (key and self._keys[page] & SKEY_ACC_MASK != key << 4) or (
            faults is not None and faults.store_protected(gaddr, size)
        ):
            raise ProgramException(PGM_PROTECTION, gaddr=gaddr, size=size, key=key, old=0)
        if faults is not None and faults.transient(size):
            raise TransientError(gaddr=gaddr, size=size, key=key, old=old)

    def _check_backed(self, gaddr: int, size: int, key: int | None, old: int) -> None:
        """Program exception 5 for an address outside guest memory."""
        if gaddr >= self.memory_size:
            raise ProgramException(PGM_ADDRESSING, gaddr=gaddr, size=size, key=key, old=old)

    @staticmethod
    def _check_mask_aligned(gaddr: int, size: int, key: int | None, old: int) -> None:
        """The kernel's ``IS_ALIGNED(gpa, len)``: a mask test, so for a size that is
        not a power of two it passes at some addresses (size 3 at 0x1001)."""
        if gaddr & (size - 1):
            raise MemopError(
                errno.EINVAL,
                "address not aligned to the size",
                gaddr=gaddr,
                size=size,
                key=key,
                old=old,
            )

    def _cas_in_word(
        self, gaddr: int, size: int, old: int, new: int, key: int | None
    ) -> tuple[bool, int]:
        """CS on the aligned word holding the 1 or 2 target bytes, as the kernel does.

        Up to :data:`MAX_NEIGHBOUR_ROUNDS` CS attempts; one that fails because
        only neighbouring bytes changed is retried.  As in the kernel, a failed
        attempt is first judged by the word it returned: if the target bytes
        changed it is a failed compare, even on the last round.
        """
        word = gaddr & ~3
        shift = (4 - (gaddr & 3) - size) << 3
        mask = ((1 << (size << 3)) - 1) << shift
        atomics = self.memory.atomics
        cas = atomics.cas[4]
        current = atomics.load[4](word)
        for _ in range(MAX_NEIGHBOUR_ROUNDS):
            seen = (current & mask) >> shift
            if seen != old:
                return False, seen
            exchanged, current = cas(word, current, (current & ~mask) | new << shift)
            if exchanged:
                return True, old
        seen = (current & mask) >> shift
        if seen != old:
            return False, seen
        raise TransientError(gaddr=gaddr, size=size, key=key, old=seen)

    # ------------------------------------------------------------ read / write

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        """Absolute fetch: protection only when the key differs and F is set."""
        pages = self.check_access(gaddr, size, key, store=False)
        keys = self._keys
        for page in pages:
            keys[page] |= SKEY_R
        return self.memory.read(gaddr, size)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        """Absolute store: protection when a non-zero key differs from ACC."""
        pages = self.check_access(gaddr, len(data), key, store=True)
        keys = self._keys
        for page in pages:
            keys[page] |= _RC
        self.memory.write(gaddr, data)

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        """``F_CHECK_ONLY``: the kernel's ``kvm_s390_vm_mem_op_abs`` and ``check_gpa_range``.

        The kernel tests only the first byte for a memslot, then (for a
        non-zero key only) each page with ``vm_check_access_key``, whose
        ``gfn_to_hva`` asks for a writable mapping: a page outside memory or
        in a read-only memslot is addressing, for a fetch check too.
        Nothing is accessed, so R and C stay as they are.  The first test is
        a cheap one that every step would pass (no key, no injected faults,
        inside memory); anything else runs the steps in order.
        """
        if not key and self.faults is None and 0 <= gaddr < self.memory_size and 0 < size <= 16:
            return  # key None or 0: no page is looked at, and nothing else can refuse
        if not 0 <= gaddr < 1 << 64:
            raise ValueError(f"gaddr {gaddr:#x} is not a 64-bit guest address")
        _check_size_and_key(gaddr, size, key, 0)
        if gaddr >= self.memory_size:
            raise ProgramException(PGM_ADDRESSING, gaddr=gaddr, size=size, key=key, old=0)
        if key:
            acc = key << 4
            for page in range(gaddr >> PAGE_SHIFT, ((gaddr + size - 1) >> PAGE_SHIFT) + 1):
                if page >= len(self._keys) or page in self._readonly:
                    raise ProgramException(PGM_ADDRESSING, gaddr=gaddr, size=size, key=key, old=0)
                skey = self._keys[page]
                if skey & SKEY_ACC_MASK != acc and (store or skey & SKEY_FP):
                    raise ProgramException(PGM_PROTECTION, gaddr=gaddr, size=size, key=key, old=0)
        if store and self.faults is not None and self.faults.store_protected(gaddr, size):
            raise ProgramException(PGM_PROTECTION, gaddr=gaddr, size=size, key=key, old=0)

    def check_access(self, gaddr: int, size: int, key: int | None, *, store: bool) -> range:
        """Validate an absolute read or write; return the pages it touches."""
        if not 0 <= gaddr < 1 << 64:
            raise ValueError(f"gaddr {gaddr:#x} is not a 64-bit guest address")
        _check_size_and_key(gaddr, size, key, 0)
        if gaddr + size > self.memory_size:
            raise ProgramException(PGM_ADDRESSING, gaddr=gaddr, size=size, key=key, old=0)
        pages = range(gaddr >> PAGE_SHIFT, ((gaddr + size - 1) >> PAGE_SHIFT) + 1)
        if store and self._readonly and any(p in self._readonly for p in pages):
            raise MemopError(errno.EOPNOTSUPP, "read-only memslot", gaddr=gaddr, size=size, key=key)
        protected = False
        if key:
            acc = key << 4
            protected = any(
                self._keys[p] & SKEY_ACC_MASK != acc and (store or self._keys[p] & SKEY_FP)
                for p in pages
            )
        if protected or (
            store and self.faults is not None and self.faults.store_protected(gaddr, size)
        ):
            raise ProgramException(PGM_PROTECTION, gaddr=gaddr, size=size, key=key, old=0)
        return pages

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Unmap the memory."""
        self.memory.close()


_FAULTIN_REASONS = {
    errno.EINTR: "page fault-in interrupted by a fatal signal",
    errno.ENOMEM: "page fault-in ran out of memory",
    errno.EFAULT: "page fault-in failed on the host",
}


def _check_size_and_key(gaddr: int, size: int, key: int | None, old: int) -> None:
    """Kernel step 1, common to every VM memop: size 0, size over the maximum, key."""
    reason, code = None, errno.EINVAL
    if size <= 0:
        reason = "size 0"
    elif size > MEM_OP_MAX_SIZE:
        reason, code = f"size over {MEM_OP_MAX_SIZE}", errno.E2BIG
    elif key is not None and not 0 <= key <= 15:
        reason = "access key outside 0..15"
    if reason is not None:
        raise MemopError(code, reason, gaddr=gaddr, size=size, key=key, old=old)
