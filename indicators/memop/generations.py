"""The two kernel generations of the cmpxchg memop, and telling them apart.

Linux 6.3 merged the storage-key-checked ``KVM_S390_MEMOP_ABSOLUTE_CMPXCHG``;
the s390 KVM "new gmap" rework (7.0 merge window) rewrote the two functions
behind it, ``kvm_s390_vm_mem_op_cmpxchg()`` (arch/s390/kvm/kvm-s390.c) and
``cmpxchg_guest_abs_with_key()`` (arch/s390/kvm/gaccess.c).  The ABI, the
capability value and what a caller must do are unchanged; a few observable
outcomes are not.  ``docs/kernel-generations.md`` lists them with their source.

- ``"6.3"``: Linux 6.3 up to 6.19;
- ``"7.0"``: Linux 7.0 and later.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

__all__ = ["GENERATIONS", "Generation", "check_generation", "generation_of_release"]

Generation = Literal["6.3", "7.0"]
GENERATIONS: tuple[Generation, ...] = get_args(Generation)

_RELEASE = re.compile(r"(\d+)\.(\d+)")


def check_generation(kernel: str) -> Generation:
    """``kernel`` as a :data:`Generation`; ValueError naming the choices otherwise."""
    for generation in GENERATIONS:
        if kernel == generation:
            return generation
    raise ValueError(f"kernel generation {kernel!r} is not one of {', '.join(GENERATIONS)}")


def generation_of_release(release: str) -> Generation | None:
    """The generation of a kernel release string (``uname -r``), None when unknown.

    Before 6.3 there is no cmpxchg memop, so such a release (or one that does
    not start with ``MAJOR.MINOR``) has no generation.
    """
    match = _RELEASE.match(release)
    if match is None:
        return None
    version = (int(match[1]), int(match[2]))
    if version >= (7, 0):
        return "7.0"
    if version >= (6, 3):
        return "6.3"
    return None
