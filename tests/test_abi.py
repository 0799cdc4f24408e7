"""indicators.abi against the spec's numbers and against this machine's kernel headers.

Two tables.  SPEC holds the values written in shared/spec/memop-cmpxchg.md,
each compared with abi.py.  The header check compiles tests/c/abi_probe.c
against <linux/kvm.h> at test time and compares every size, offset, ioctl
number and constant it prints with what abi.py computes; what a header
lacks (Linux 6.1 has no cmpxchg fields, an x86 <asm/kvm.h> no FLIC
attributes) is skipped, by name.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from indicators import abi

PROBE_SOURCE = Path(__file__).parent / "c" / "abi_probe.c"

# ------------------------------------------------------------ the spec's values

MEM_OP = abi.KvmS390MemOp

SPEC: list[tuple[str, int, int]] = [
    # struct kvm_s390_mem_op: 64 bytes, 8-byte aligned, same in both ABIs.
    ("sizeof(kvm_s390_mem_op)", ctypes.sizeof(MEM_OP), 64),
    ("alignof(kvm_s390_mem_op)", ctypes.alignment(MEM_OP), 8),
    ("offsetof(kvm_s390_mem_op.gaddr)", MEM_OP.gaddr.offset, 0),
    ("offsetof(kvm_s390_mem_op.flags)", MEM_OP.flags.offset, 8),
    ("offsetof(kvm_s390_mem_op.size)", MEM_OP.size.offset, 16),
    ("offsetof(kvm_s390_mem_op.op)", MEM_OP.op.offset, 20),
    ("offsetof(kvm_s390_mem_op.buf)", MEM_OP.buf.offset, 24),
    ("offsetof(kvm_s390_mem_op.ar)", MEM_OP.ar.offset, 32),
    ("offsetof(kvm_s390_mem_op.key)", MEM_OP.key.offset, 33),
    ("offsetof(kvm_s390_mem_op.pad1)", MEM_OP.pad1.offset, 34),
    ("sizeof(kvm_s390_mem_op.pad1)", MEM_OP.pad1.size, 6),
    ("offsetof(kvm_s390_mem_op.old_addr)", MEM_OP.old_addr.offset, 40),
    ("offsetof(kvm_s390_mem_op.sida_offset)", MEM_OP.sida_offset.offset, 32),
    ("offsetof(kvm_s390_mem_op.reserved)", MEM_OP.reserved.offset, 32),
    ("sizeof(kvm_s390_mem_op.reserved)", MEM_OP.reserved.size, 32),
    # Ops and flags.
    ("KVM_S390_MEMOP_LOGICAL_READ", abi.KVM_S390_MEMOP_LOGICAL_READ, 0),
    ("KVM_S390_MEMOP_LOGICAL_WRITE", abi.KVM_S390_MEMOP_LOGICAL_WRITE, 1),
    ("KVM_S390_MEMOP_SIDA_READ", abi.KVM_S390_MEMOP_SIDA_READ, 2),
    ("KVM_S390_MEMOP_SIDA_WRITE", abi.KVM_S390_MEMOP_SIDA_WRITE, 3),
    ("KVM_S390_MEMOP_ABSOLUTE_READ", abi.KVM_S390_MEMOP_ABSOLUTE_READ, 4),
    ("KVM_S390_MEMOP_ABSOLUTE_WRITE", abi.KVM_S390_MEMOP_ABSOLUTE_WRITE, 5),
    ("KVM_S390_MEMOP_ABSOLUTE_CMPXCHG", abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG, 6),
    ("KVM_S390_MEMOP_F_CHECK_ONLY", abi.KVM_S390_MEMOP_F_CHECK_ONLY, 1 << 0),
    ("KVM_S390_MEMOP_F_INJECT_EXCEPTION", abi.KVM_S390_MEMOP_F_INJECT_EXCEPTION, 1 << 1),
    ("KVM_S390_MEMOP_F_SKEY_PROTECTION", abi.KVM_S390_MEMOP_F_SKEY_PROTECTION, 1 << 2),
    ("KVM_S390_MEMOP_F_CMPXCHG", abi.KVM_S390_MEMOP_F_CMPXCHG, 1 << 3),
    ("KVM_S390_MEMOP_R_NO_XCHG", abi.KVM_S390_MEMOP_R_NO_XCHG, 1 << 16),
    # Capabilities.
    ("KVM_S390_MEMOP_EXTENSION_CAP_BASE", abi.KVM_S390_MEMOP_EXTENSION_CAP_BASE, 1 << 0),
    ("KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG", abi.KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG, 1 << 1),
    ("KVM_CAP_S390_MEM_OP", abi.KVM_CAP_S390_MEM_OP, 108),
    ("KVM_CAP_S390_MEM_OP_EXTENSION", abi.KVM_CAP_S390_MEM_OP_EXTENSION, 211),
    ("MEM_OP_MAX_SIZE", abi.MEM_OP_MAX_SIZE, 65536),
    # ioctl numbers.
    ("KVMIO", abi.KVMIO, 0xAE),
    ("KVM_CHECK_EXTENSION", abi.KVM_CHECK_EXTENSION, 0x0000AE03),
    ("KVM_S390_INTERRUPT", abi.KVM_S390_INTERRUPT, 0x4010AE94),
    ("KVM_S390_MEM_OP", abi.KVM_S390_MEM_OP, 0x4040AEB1),
    ("KVM_S390_GET_SKEYS", abi.KVM_S390_GET_SKEYS, 0x4040AEB2),
    ("KVM_S390_SET_SKEYS", abi.KVM_S390_SET_SKEYS, 0x4040AEB3),
    ("KVM_S390_IRQ", abi.KVM_S390_IRQ, 0x4048AEB4),
    # struct kvm_s390_interrupt and the adapter interrupt.
    ("sizeof(kvm_s390_interrupt)", ctypes.sizeof(abi.KvmS390Interrupt), 16),
    ("offsetof(kvm_s390_interrupt.type)", abi.KvmS390Interrupt.type.offset, 0),
    ("offsetof(kvm_s390_interrupt.parm)", abi.KvmS390Interrupt.parm.offset, 4),
    ("offsetof(kvm_s390_interrupt.parm64)", abi.KvmS390Interrupt.parm64.offset, 8),
    ("KVM_S390_INT_IO(1, 0, 0, 0)", abi.kvm_s390_int_io(1, 0, 0, 0), 0x04000000),
    ("KVM_S390_INT_IO(0, 3, 2, 0x1234)", abi.kvm_s390_int_io(0, 3, 2, 0x1234), 0xE1234),
    ("KVM_S390_INT_IO_AI_MASK", abi.KVM_S390_INT_IO_AI_MASK, 0x04000000),
    # struct kvm_s390_skeys.
    ("sizeof(kvm_s390_skeys)", ctypes.sizeof(abi.KvmS390Skeys), 64),
    ("offsetof(kvm_s390_skeys.start_gfn)", abi.KvmS390Skeys.start_gfn.offset, 0),
    ("offsetof(kvm_s390_skeys.count)", abi.KvmS390Skeys.count.offset, 8),
    ("offsetof(kvm_s390_skeys.skeydata_addr)", abi.KvmS390Skeys.skeydata_addr.offset, 16),
    ("offsetof(kvm_s390_skeys.flags)", abi.KvmS390Skeys.flags.offset, 24),
    ("offsetof(kvm_s390_skeys.reserved)", abi.KvmS390Skeys.reserved.offset, 28),
    ("KVM_S390_GET_SKEYS_NONE", abi.KVM_S390_GET_SKEYS_NONE, 1),
    ("KVM_S390_SKEYS_MAX", abi.KVM_S390_SKEYS_MAX, 1048576),
    # FLIC.
    ("KVM_DEV_FLIC_AISM", abi.KVM_DEV_FLIC_AISM, 9),
    ("KVM_DEV_FLIC_AIRQ_INJECT", abi.KVM_DEV_FLIC_AIRQ_INJECT, 10),
    ("KVM_DEV_FLIC_AISM_ALL", abi.KVM_DEV_FLIC_AISM_ALL, 11),
    ("KVM_S390_ADAPTER_SUPPRESSIBLE", abi.KVM_S390_ADAPTER_SUPPRESSIBLE, 0x01),
    ("sizeof(kvm_s390_ais_req)", ctypes.sizeof(abi.KvmS390AisReq), 4),
    ("offsetof(kvm_s390_ais_req.isc)", abi.KvmS390AisReq.isc.offset, 0),
    ("offsetof(kvm_s390_ais_req.mode)", abi.KvmS390AisReq.mode.offset, 2),
    # Program interruption codes and the storage key byte.
    ("PGM_PROTECTION", abi.PGM_PROTECTION, 4),
    ("PGM_ADDRESSING", abi.PGM_ADDRESSING, 5),
    ("SKEY_ACC_MASK", abi.SKEY_ACC_MASK, 0xF0),
    ("SKEY_FP", abi.SKEY_FP, 0x08),
    ("SKEY_R", abi.SKEY_R, 0x04),
    ("SKEY_C", abi.SKEY_C, 0x02),
    ("SKEY_RESERVED", abi.SKEY_RESERVED, 0x01),
    ("PAGE_SIZE", abi.PAGE_SIZE, 4096),
]


@pytest.mark.parametrize(("name", "ours", "spec"), SPEC, ids=[row[0] for row in SPEC])
def test_abi_matches_spec(name: str, ours: int, spec: int) -> None:
    assert ours == spec, f"{name}: abi.py has {ours:#x}, the spec says {spec:#x}"


@pytest.mark.parametrize("isc", range(8))
def test_adapter_interrupt_encoding(isc: int) -> None:
    irq = abi.adapter_interrupt(isc)
    assert (irq.type, irq.parm, irq.parm64) == (0x04000000, 0, 0x80000000 | isc << 27), (
        f"isc {isc}: expected type KVM_S390_INT_IO(1,0,0,0), parm 0, parm64 0x80000000 | isc << 27"
    )
    assert abi.io_int_word(isc) == 0x80000000 | isc << 27
    assert abi.isc_mask(isc) == 0x80 >> isc
    assert abi.adapter_id(3, isc) == 3 << 3 | isc


@pytest.mark.parametrize("helper", [abi.io_int_word, abi.adapter_interrupt, abi.isc_mask])
@pytest.mark.parametrize("isc", [-1, 8])
def test_isc_outside_0_to_7_is_refused(helper: object, isc: int) -> None:
    with pytest.raises(ValueError, match="isc"):
        helper(isc)  # type: ignore[operator]


def test_ioctl_size_must_fit_14_bits() -> None:
    class TooBig(ctypes.Structure):
        _fields_ = (("data", ctypes.c_uint8 * (1 << 14)),)

    with pytest.raises(ValueError, match="14 bits"):
        abi._iow(abi.KVMIO, 0xB1, TooBig)


# -------------------------------------------------------- the machine's headers

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "kvm_s390_mem_op": abi.KvmS390MemOp,
    "kvm_s390_interrupt": abi.KvmS390Interrupt,
    "kvm_s390_skeys": abi.KvmS390Skeys,
    "kvm_s390_irq": abi.KvmS390Irq,
    "kvm_device_attr": abi.KvmDeviceAttr,
    "kvm_create_device": abi.KvmCreateDevice,
    "kvm_userspace_memory_region": abi.KvmUserspaceMemoryRegion,
    "kvm_s390_ais_req": abi.KvmS390AisReq,
}
FIELDS: dict[str, tuple[str, ...]] = {
    "kvm_s390_mem_op": (
        "gaddr",
        "flags",
        "size",
        "op",
        "buf",
        "ar",
        "key",
        "pad1",
        "old_addr",
        "sida_offset",
        "reserved",
    ),
    "kvm_s390_interrupt": ("type", "parm", "parm64"),
    "kvm_s390_skeys": ("start_gfn", "count", "skeydata_addr", "flags", "reserved"),
    "kvm_s390_irq": ("type", "u"),
    "kvm_device_attr": ("flags", "group", "attr", "addr"),
    "kvm_create_device": ("type", "fd", "flags"),
    "kvm_userspace_memory_region": (
        "slot",
        "flags",
        "guest_phys_addr",
        "memory_size",
        "userspace_addr",
    ),
    "kvm_s390_ais_req": ("isc", "mode"),
}
CONSTANTS = (
    "KVMIO",
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_CHECK_EXTENSION",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_S390_INTERRUPT",
    "KVM_S390_MEM_OP",
    "KVM_S390_GET_SKEYS",
    "KVM_S390_SET_SKEYS",
    "KVM_S390_IRQ",
    "KVM_CREATE_DEVICE",
    "KVM_SET_DEVICE_ATTR",
    "KVM_S390_MEMOP_LOGICAL_READ",
    "KVM_S390_MEMOP_LOGICAL_WRITE",
    "KVM_S390_MEMOP_SIDA_READ",
    "KVM_S390_MEMOP_SIDA_WRITE",
    "KVM_S390_MEMOP_ABSOLUTE_READ",
    "KVM_S390_MEMOP_ABSOLUTE_WRITE",
    "KVM_S390_MEMOP_ABSOLUTE_CMPXCHG",
    "KVM_S390_MEMOP_F_CHECK_ONLY",
    "KVM_S390_MEMOP_F_INJECT_EXCEPTION",
    "KVM_S390_MEMOP_F_SKEY_PROTECTION",
    "KVM_S390_MEMOP_EXTENSION_CAP_BASE",
    "KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG",
    "KVM_CAP_S390_MEM_OP",
    "KVM_CAP_S390_SKEYS",
    "KVM_CAP_S390_AIS",
    "KVM_CAP_S390_MEM_OP_EXTENSION",
    "KVM_S390_GET_SKEYS_NONE",
    "KVM_S390_SKEYS_MAX",
    "KVM_DEV_TYPE_FLIC",
    "KVM_S390_INT_IO_AI_MASK",
    "KVM_DEV_FLIC_AISM",
    "KVM_DEV_FLIC_AIRQ_INJECT",
    "KVM_DEV_FLIC_AISM_ALL",
    "KVM_S390_ADAPTER_SUPPRESSIBLE",
    "KVM_S390_AIS_MODE_ALL",
    "KVM_S390_AIS_MODE_SINGLE",
)

#: What the probe's headers must always define (the stable ABI, Linux 5.x on).
ALWAYS_IN_HEADERS = (
    "sizeof(kvm_s390_mem_op)",
    "offsetof(kvm_s390_mem_op.key)",
    "KVM_S390_MEM_OP",
    "KVM_S390_INTERRUPT",
    "KVM_CAP_S390_MEM_OP",
    "KVM_S390_INT_IO(1, 0, 0, 0)",
)


def _ours() -> dict[str, int]:
    """Every value the probe may print, as abi.py has it."""
    values: dict[str, int] = {}
    for cname, struct in STRUCTS.items():
        values[f"sizeof({cname})"] = ctypes.sizeof(struct)
        for field in FIELDS[cname]:
            values[f"offsetof({cname}.{field})"] = getattr(struct, field).offset
    for name in CONSTANTS:
        values[name] = getattr(abi, name)
    values["KVM_S390_INT_IO(1, 0, 0, 0)"] = abi.kvm_s390_int_io(1, 0, 0, 0)
    values["KVM_S390_INT_IO(0, 3, 2, 0x1234)"] = abi.kvm_s390_int_io(0, 3, 2, 0x1234)
    return values


OURS = _ours()


def _unavailable(reason: str) -> None:
    """Skip on a developer's machine, fail in CI, where the toolchain is required."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The probe's output: name -> value, from this machine's <linux/kvm.h>."""
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("gcc is not installed: cannot compare abi.py with <linux/kvm.h>")
    binary = tmp_path_factory.mktemp("abi_probe") / "abi_probe"
    build = subprocess.run(
        [str(gcc), "-std=gnu11", "-Wall", "-Werror", "-o", str(binary), str(PROBE_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode and "linux/kvm.h" in build.stderr and "No such file" in build.stderr:
        _unavailable("<linux/kvm.h> is missing (Debian: linux-libc-dev)")
    assert build.returncode == 0, f"abi_probe.c does not compile:\n{build.stderr}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    values = {}
    for line in run.stdout.splitlines():
        name, _, value = line.rpartition("=")
        values[name] = int(value)
    return values


def test_probe_prints_only_names_abi_py_knows(headers: dict[str, int]) -> None:
    unknown = sorted(set(headers) - set(OURS))
    assert not unknown, f"the probe prints values abi.py has no counterpart for: {unknown}"


def test_probe_sees_the_stable_abi(headers: dict[str, int]) -> None:
    missing = [name for name in ALWAYS_IN_HEADERS if name not in headers]
    assert not missing, f"<linux/kvm.h> lacks the stable memop ABI: {missing}"


@pytest.mark.parametrize("name", sorted(OURS))
def test_abi_matches_kernel_headers(headers: dict[str, int], name: str) -> None:
    if name not in headers:
        pytest.skip(f"{name} is not in this machine's headers")
    assert OURS[name] == headers[name], (
        f"{name}: abi.py has {OURS[name]:#x}, <linux/kvm.h> says {headers[name]:#x}"
    )
