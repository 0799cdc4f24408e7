"""The KVM s390 user-space ABI this project speaks, as ctypes types.

Everything here is a value from ``include/uapi/linux/kvm.h`` (and the s390
``asm/kvm.h``) for Linux 6.3 and later, plus the v5 review version of the
cmpxchg series that the project's seed describes.  Structures are ctypes
``Structure`` classes whose sizes and offsets equal the kernel's; ioctl numbers
are computed from those sizes with the same ``_IO``/``_IOW`` arithmetic as
``asm-generic/ioctl.h``, never typed in, so a wrong structure shows up as a
wrong ioctl number in the tests.

Nothing in this module performs I/O.
"""

from __future__ import annotations

import ctypes

# --------------------------------------------------------------- ioctl numbers

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl number as ``asm-generic/ioctl.h`` does."""
    if not 0 <= size < 1 << 14:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (
        direction << _IOC_DIRSHIFT
        | size << _IOC_SIZESHIFT
        | type_ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
    )


def _io(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: an ioctl without an argument structure."""
    return _ioc(_IOC_NONE, type_, nr, 0)


def _iow(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    """``_IOW(type, nr, struct)``: user space passes ``struct`` to the kernel."""
    return _ioc(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _iowr(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    """``_IOWR(type, nr, struct)``."""
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


# ------------------------------------------------------------------ structures


class _MemOpKey(ctypes.Structure):
    _fields_ = (
        ("ar", ctypes.c_uint8),
        ("key", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8 * 6),
        ("old_addr", ctypes.c_uint64),
    )


class _MemOpUnion(ctypes.Union):
    _anonymous_ = ("_s",)
    _fields_ = (
        ("_s", _MemOpKey),
        ("sida_offset", ctypes.c_uint32),
        ("reserved", ctypes.c_uint8 * 32),
    )


class KvmS390MemOp(ctypes.Structure):
    """``struct kvm_s390_mem_op`` (64 bytes).

    ``buf`` points at the NEW value of a cmpxchg, ``old_addr`` at the expected
    one; both are ``size`` bytes, big-endian as in guest memory.
    """

    _anonymous_ = ("_u",)
    _fields_ = (
        ("gaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("op", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("_u", _MemOpUnion),
    )


class KvmS390Interrupt(ctypes.Structure):
    """``struct kvm_s390_interrupt`` (16 bytes), the KVM_S390_INTERRUPT argument."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("parm", ctypes.c_uint32),
        ("parm64", ctypes.c_uint64),
    )


class KvmS390Skeys(ctypes.Structure):
    """``struct kvm_s390_skeys`` (64 bytes), for KVM_S390_GET/SET_SKEYS."""

    _fields_ = (
        ("start_gfn", ctypes.c_uint64),
        ("count", ctypes.c_uint64),
        ("skeydata_addr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 9),
    )


class KvmS390Irq(ctypes.Structure):
    """``struct kvm_s390_irq`` (72 bytes): a type and a 64-byte payload union."""

    _fields_ = (
        ("type", ctypes.c_uint64),
        ("u", ctypes.c_uint8 * 64),
    )


class KvmS390AisReq(ctypes.Structure):
    """``struct kvm_s390_ais_req`` (4 bytes), for the FLIC AISM attribute."""

    _fields_ = (
        ("isc", ctypes.c_uint8),
        ("mode", ctypes.c_uint16),
    )


class KvmDeviceAttr(ctypes.Structure):
    """``struct kvm_device_attr`` (24 bytes), for KVM_SET_DEVICE_ATTR on the FLIC."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("group", ctypes.c_uint32),
        ("attr", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    )


class KvmCreateDevice(ctypes.Structure):
    """``struct kvm_create_device`` (12 bytes)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (32 bytes), to give a VM a memslot."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


# ------------------------------------------------------------------- constants

# kvm_s390_mem_op.op
KVM_S390_MEMOP_LOGICAL_READ = 0
KVM_S390_MEMOP_LOGICAL_WRITE = 1
KVM_S390_MEMOP_SIDA_READ = 2
KVM_S390_MEMOP_SIDA_WRITE = 3
KVM_S390_MEMOP_ABSOLUTE_READ = 4
KVM_S390_MEMOP_ABSOLUTE_WRITE = 5
KVM_S390_MEMOP_ABSOLUTE_CMPXCHG = 6  # upstream (6.3+) only

# kvm_s390_mem_op.flags
KVM_S390_MEMOP_F_CHECK_ONLY = 1 << 0
KVM_S390_MEMOP_F_INJECT_EXCEPTION = 1 << 1
KVM_S390_MEMOP_F_SKEY_PROTECTION = 1 << 2
KVM_S390_MEMOP_F_CMPXCHG = 1 << 3  # v5 only

# Non-program-exception return code of the v5 cmpxchg (program codes are 16 bit).
KVM_S390_MEMOP_R_NO_XCHG = 1 << 16

# Bits of KVM_CHECK_EXTENSION(KVM_CAP_S390_MEM_OP_EXTENSION).
KVM_S390_MEMOP_EXTENSION_CAP_BASE = 1 << 0
KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG = 1 << 1

KVM_CAP_S390_MEM_OP = 108
KVM_CAP_S390_SKEYS = 110
KVM_CAP_S390_AIS = 141
KVM_CAP_S390_MEM_OP_EXTENSION = 211

MEM_OP_MAX_SIZE = 65536  # what KVM_CHECK_EXTENSION(KVM_CAP_S390_MEM_OP) returns

KVM_S390_GET_SKEYS_NONE = 1
KVM_S390_SKEYS_MAX = 1048576

# Program interruption codes a memop can report.
PGM_PROTECTION = 0x04
PGM_ADDRESSING = 0x05

# Storage key byte: access-control bits, fetch protection, reference, change.
SKEY_ACC_MASK = 0xF0
SKEY_FP = 0x08
SKEY_R = 0x04
SKEY_C = 0x02
SKEY_RESERVED = 0x01
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# FLIC device (KVM_DEV_TYPE_FLIC) attribute groups.
KVM_DEV_TYPE_FLIC = 6
KVM_DEV_FLIC_AISM = 9
KVM_DEV_FLIC_AIRQ_INJECT = 10
KVM_DEV_FLIC_AISM_ALL = 11
KVM_S390_ADAPTER_SUPPRESSIBLE = 0x01
KVM_S390_AIS_MODE_ALL = 0
KVM_S390_AIS_MODE_SINGLE = 1

# ioctls: on /dev/kvm and the VM fd.
KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_SET_USER_MEMORY_REGION = _iow(KVMIO, 0x46, KvmUserspaceMemoryRegion)
KVM_S390_INTERRUPT = _iow(KVMIO, 0x94, KvmS390Interrupt)
KVM_S390_MEM_OP = _iow(KVMIO, 0xB1, KvmS390MemOp)
KVM_S390_GET_SKEYS = _iow(KVMIO, 0xB2, KvmS390Skeys)
KVM_S390_SET_SKEYS = _iow(KVMIO, 0xB3, KvmS390Skeys)
KVM_S390_IRQ = _iow(KVMIO, 0xB4, KvmS390Irq)
KVM_CREATE_DEVICE = _iowr(KVMIO, 0xE0, KvmCreateDevice)
KVM_SET_DEVICE_ATTR = _iow(KVMIO, 0xE1, KvmDeviceAttr)

# ------------------------------------------------------- adapter interrupts

KVM_S390_INT_IO_AI_MASK = 0x04000000
IO_INT_WORD_AI = 0x80000000


def kvm_s390_int_io(ai: int, cssid: int, ssid: int, schid: int) -> int:
    """``KVM_S390_INT_IO(ai, cssid, ssid, schid)``: an I/O interrupt type."""
    return schid | ssid << 16 | cssid << 18 | ai << 26


def io_int_word(isc: int) -> int:
    """The interruption word of an adapter interrupt for ``isc``."""
    _check_isc(isc)
    return IO_INT_WORD_AI | isc << 27


def adapter_interrupt(isc: int) -> KvmS390Interrupt:
    """The KVM_S390_INTERRUPT argument that injects an adapter interrupt."""
    return KvmS390Interrupt(type=kvm_s390_int_io(1, 0, 0, 0), parm=0, parm64=io_int_word(isc))


def adapter_id(adapter_type: int, isc: int) -> int:
    """QEMU's adapter id: ``type << 3 | isc``."""
    _check_isc(isc)
    return adapter_type << 3 | isc


def isc_mask(isc: int) -> int:
    """The per-ISC bit in the simm/nimm masks (``0x80 >> isc``)."""
    _check_isc(isc)
    return 0x80 >> isc


def _check_isc(isc: int) -> None:
    if not 0 <= isc <= 7:
        raise ValueError(f"isc {isc} is outside 0..7")
