"""KvmBackend: ABI detection, refusals, interrupt injection, and a real VM (opt-in).

Everything but the last test runs on any host, with the ioctl injected:
:class:`~indicators.memop.kernel.EmulatedKvm` plays the kernel of either
ABI.  The last test needs an s390x host with KVM and ``INDICATORS_REAL_KVM=1``:
it creates a VM with one memslot and runs the conformance suite's core
cases against the real ``KVM_S390_MEM_OP``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from collections.abc import Iterator

import pytest
import test_memop_conformance as conformance
from conftest import MemopRig, emulated_rig

from indicators import abi
from indicators.memop import EmulatedBackend, KvmBackend, KvmUnavailableError
from indicators.memop.kernel import EmulatedKvm
from indicators.memop.kvm import IoctlFn, system_ioctl

VM_FD = 7


class Recorder:
    """Wraps an ioctl and records ``(fd, request, mem_op copy or arg)`` of each call."""

    def __init__(self, inner: IoctlFn) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, object]] = []

    def __call__(self, fd: int, request: int, arg: int) -> int:
        seen: object = arg
        if request == abi.KVM_S390_MEM_OP:
            seen = abi.KvmS390MemOp.from_buffer_copy(ctypes.string_at(arg, 64))
        self.calls.append((fd, request, seen))
        return self.inner(fd, request, arg)


# ------------------------------------------------------------- ABI detection


@pytest.mark.parametrize("kernel_abi", ["upstream", "v5"])
def test_auto_detects_the_kernel_abi(emulated_backend: EmulatedBackend, kernel_abi: str) -> None:
    emulated_backend.set_storage_key(0, 0x30)
    before = emulated_backend.memory.snapshot()
    kernel = Recorder(EmulatedKvm(emulated_backend, kernel_abi))  # type: ignore[arg-type]

    backend = KvmBackend(VM_FD, abi_version="auto", ioctl=kernel)

    assert backend.abi == kernel_abi, f"expected the probe to find the {kernel_abi} ABI"
    assert [request for _, request, _ in kernel.calls] == [
        abi.KVM_CHECK_EXTENSION,
        abi.KVM_S390_MEM_OP,
    ], "expected one capability check and one probe"
    assert all(fd == VM_FD for fd, _, _ in kernel.calls), "expected every ioctl on the VM fd"
    probe = kernel.calls[1][2]
    assert isinstance(probe, abi.KvmS390MemOp)
    assert probe.op == abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG
    assert probe.gaddr >= 1 << 63, "expected the probe far past any guest's memory"
    assert emulated_backend.memory.snapshot() == before, "expected the probe to touch no memory"
    assert emulated_backend.get_storage_key(0) == 0x30, "expected no R/C from the probe"


@pytest.mark.parametrize("kernel_abi", ["upstream", "v5"])
def test_explicit_abi_skips_the_probe(emulated_backend: EmulatedBackend, kernel_abi: str) -> None:
    kernel = Recorder(EmulatedKvm(emulated_backend, kernel_abi))  # type: ignore[arg-type]
    backend = KvmBackend(VM_FD, abi_version=kernel_abi, ioctl=kernel)  # type: ignore[arg-type]
    assert backend.abi == kernel_abi
    assert [request for _, request, _ in kernel.calls] == [abi.KVM_CHECK_EXTENSION]


@pytest.mark.parametrize("kernel_abi", ["upstream", "v5"])
def test_cmpxchg_marshalling_per_abi(emulated_backend: EmulatedBackend, kernel_abi: str) -> None:
    kernel = Recorder(EmulatedKvm(emulated_backend, kernel_abi))  # type: ignore[arg-type]
    backend = KvmBackend(VM_FD, abi_version=kernel_abi, ioctl=kernel)  # type: ignore[arg-type]
    emulated_backend.set_storage_key(0x100, 0x50)
    assert backend.cmpxchg(0x100, 4, 0, 0x01020304, key=5).exchanged
    mop = kernel.calls[-1][2]
    assert isinstance(mop, abi.KvmS390MemOp)
    if kernel_abi == "upstream":
        assert (mop.op, mop.flags) == (
            abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG,
            abi.KVM_S390_MEMOP_F_SKEY_PROTECTION,
        ), "expected op ABSOLUTE_CMPXCHG with only F_SKEY_PROTECTION"
    else:
        assert (mop.op, mop.flags) == (
            abi.KVM_S390_MEMOP_ABSOLUTE_WRITE,
            abi.KVM_S390_MEMOP_F_CMPXCHG | abi.KVM_S390_MEMOP_F_SKEY_PROTECTION,
        ), "expected op ABSOLUTE_WRITE with F_CMPXCHG"
    assert (mop.gaddr, mop.size, mop.key) == (0x100, 4, 5)
    assert ctypes.string_at(mop.buf, 4) == bytes([1, 2, 3, 4]), "expected buf -> new, big-endian"
    assert backend.cmpxchg(0x100, 4, 0x01020304, 0).exchanged
    unkeyed = kernel.calls[-1][2]
    assert isinstance(unkeyed, abi.KvmS390MemOp)
    assert not unkeyed.flags & abi.KVM_S390_MEMOP_F_SKEY_PROTECTION, "expected key=None: no flag"


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("abi_version", ["auto", "upstream", "v5"])
@pytest.mark.parametrize(
    "extension", [0, abi.KVM_S390_MEMOP_EXTENSION_CAP_BASE], ids=["before 5.18", "CAP_BASE only"]
)
def test_refuses_a_kernel_without_cap_cmpxchg(
    emulated_backend: EmulatedBackend, abi_version: str, extension: int
) -> None:
    kernel = EmulatedKvm(emulated_backend, "upstream", extension=extension)
    with pytest.raises(KvmUnavailableError, match=r"cmpxchg.*Linux 6\.3"):
        KvmBackend(VM_FD, abi_version=abi_version, ioctl=kernel)  # type: ignore[arg-type]


def test_refuses_when_check_extension_fails() -> None:
    def no_kvm(fd: int, request: int, arg: int) -> int:
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    with pytest.raises(KvmUnavailableError, match="KVM_CHECK_EXTENSION"):
        KvmBackend(VM_FD, ioctl=no_kvm)


@pytest.mark.parametrize(
    ("probe", "message"),
    [(0, "unexpected result 0"), (OSError(errno.EPERM, "Operation not permitted"), "probing")],
)
def test_refuses_a_probe_it_cannot_read(probe: int | OSError, message: str) -> None:
    def kernel(fd: int, request: int, arg: int) -> int:
        if request == abi.KVM_CHECK_EXTENSION:
            return 3
        if isinstance(probe, OSError):
            raise probe
        return probe

    with pytest.raises(KvmUnavailableError, match=message):
        KvmBackend(VM_FD, abi_version="auto", ioctl=kernel)


def test_refuses_a_non_s390x_host_without_an_injected_ioctl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(KvmUnavailableError, match=r"needs an s390x host.*x86_64.*emulated backend"):
        KvmBackend(VM_FD)


@pytest.mark.skipif(platform.machine() == "s390x", reason="this host is s390x")
def test_refuses_this_host() -> None:
    with pytest.raises(KvmUnavailableError, match=platform.machine()):
        KvmBackend(VM_FD)


def test_refuses_s390x_without_dev_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "s390x")
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    with pytest.raises(KvmUnavailableError, match="/dev/kvm"):
        KvmBackend(VM_FD)


# ---------------------------------------------------------------- interrupts


@pytest.mark.parametrize("isc", range(8))
def test_inject_adapter_interrupt_encoding(emulated_backend: EmulatedBackend, isc: int) -> None:
    kernel = EmulatedKvm(emulated_backend, "upstream")
    recorder = Recorder(kernel)
    backend = KvmBackend(VM_FD, abi_version="upstream", ioctl=recorder)

    backend.inject_adapter_interrupt(isc)

    assert kernel.interrupts == [(0x04000000, 0, 0x80000000 | isc << 27)], (
        "expected type KVM_S390_INT_IO(1,0,0,0), parm 0, parm64 = I/O interruption word"
    )
    assert recorder.calls[-1][:2] == (VM_FD, abi.KVM_S390_INTERRUPT), "expected it on the VM fd"


@pytest.mark.parametrize("isc", [-1, 8])
def test_inject_adapter_interrupt_refuses_bad_isc(
    emulated_backend: EmulatedBackend, isc: int
) -> None:
    kernel = EmulatedKvm(emulated_backend, "upstream")
    backend = KvmBackend(VM_FD, abi_version="upstream", ioctl=kernel)
    with pytest.raises(ValueError, match="isc"):
        backend.inject_adapter_interrupt(isc)
    assert kernel.interrupts == [], "expected nothing injected"


def test_flic_set_attr(emulated_backend: EmulatedBackend) -> None:
    kernel = EmulatedKvm(emulated_backend, "upstream")
    recorder = Recorder(kernel)
    backend = KvmBackend(VM_FD, abi_version="upstream", ioctl=recorder)
    backend.flic_set_attr(9, abi.KVM_DEV_FLIC_AIRQ_INJECT, 0x13)
    assert kernel.device_attrs == [(abi.KVM_DEV_FLIC_AIRQ_INJECT, 0x13, 0)]
    assert recorder.calls[-1][:2] == (9, abi.KVM_SET_DEVICE_ATTR), "expected it on the FLIC fd"


# ------------------------------------------------- the emulated kernel itself


def _mem_op(kernel: EmulatedKvm, **fields: int) -> int:
    old, new = ctypes.create_string_buffer(16), ctypes.create_string_buffer(16)
    mop = abi.KvmS390MemOp(gaddr=0x100, size=8, buf=ctypes.addressof(new))
    mop.old_addr = ctypes.addressof(old)
    for name, value in fields.items():
        setattr(mop, name, value)
    return kernel(VM_FD, abi.KVM_S390_MEM_OP, ctypes.addressof(mop))


EMULATED_KERNEL_ERRORS = [
    ("upstream", "null new pointer", {"op": 6, "buf": 0}, errno.EFAULT),
    ("upstream", "null old pointer", {"op": 6, "old_addr": 0}, errno.EFAULT),
    ("upstream", "CHECK_ONLY on a cmpxchg", {"op": 6, "flags": 1}, errno.EINVAL),
    ("upstream", "F_CMPXCHG is v5 only", {"op": 5, "flags": 8}, errno.EINVAL),
    ("upstream", "logical ops need a vcpu", {"op": 0}, errno.EINVAL),
    ("v5", "op 6 is upstream only", {"op": 6}, errno.EINVAL),
    ("v5", "F_CMPXCHG only with ABSOLUTE_WRITE", {"op": 4, "flags": 8}, errno.EINVAL),
    ("v5", "null old pointer", {"op": 5, "flags": 8, "old_addr": 0}, errno.EFAULT),
]


@pytest.mark.parametrize(
    ("kernel_abi", "fields", "code"),
    [(kernel_abi, fields, code) for kernel_abi, _, fields, code in EMULATED_KERNEL_ERRORS],
    ids=[f"{kernel_abi}: {why}" for kernel_abi, why, _, _ in EMULATED_KERNEL_ERRORS],
)
def test_emulated_kernel_refuses(
    emulated_backend: EmulatedBackend, kernel_abi: str, fields: dict[str, int], code: int
) -> None:
    kernel = EmulatedKvm(emulated_backend, kernel_abi)  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        _mem_op(kernel, **fields)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}"


def test_emulated_kernel_answers_capabilities(emulated_backend: EmulatedBackend) -> None:
    kernel = EmulatedKvm(emulated_backend)
    check = abi.KVM_CHECK_EXTENSION
    assert kernel(VM_FD, check, abi.KVM_CAP_S390_MEM_OP) == 65536
    assert kernel(VM_FD, check, abi.KVM_CAP_S390_MEM_OP_EXTENSION) == 3
    assert kernel(VM_FD, check, 9999) == 0
    with pytest.raises(OSError) as info:
        kernel(VM_FD, abi.KVM_S390_IRQ, 0)
    assert info.value.errno == errno.ENOTTY


# ---------------------------------------------------------------- a real VM

REAL_MEMORY = 1 << 20  # s390 memslots are 1 MiB aligned and sized


class RealVm:
    """A KVM VM with one memslot of anonymous memory at guest address 0."""

    def __init__(self) -> None:
        self.ioctl = system_ioctl()
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = self.ioctl(self.kvm, abi.KVM_CREATE_VM, 0)
        self.map = mmap.mmap(-1, 2 * REAL_MEMORY)
        anchor = ctypes.c_char.from_buffer(self.map)
        start = ctypes.addressof(anchor)
        del anchor
        self.offset = -start % REAL_MEMORY
        region = abi.KvmUserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=0,
            memory_size=REAL_MEMORY,
            userspace_addr=start + self.offset,
        )
        self.ioctl(self.vm, abi.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))

    def peek(self, gaddr: int, size: int) -> bytes:
        return self.map[self.offset + gaddr : self.offset + gaddr + size]

    def poke(self, gaddr: int, data: bytes) -> None:
        self.map[self.offset + gaddr : self.offset + gaddr + len(data)] = data

    def _skeys(self, request: int, gaddr: int, key: int = 0) -> int:
        data = ctypes.c_uint8(key)
        arg = abi.KvmS390Skeys(
            start_gfn=gaddr >> abi.PAGE_SHIFT, count=1, skeydata_addr=ctypes.addressof(data)
        )
        rc = self.ioctl(self.vm, request, ctypes.addressof(arg))
        return 0 if rc == abi.KVM_S390_GET_SKEYS_NONE else data.value

    def set_storage_key(self, gaddr: int, key: int) -> None:
        self._skeys(abi.KVM_S390_SET_SKEYS, gaddr, key)

    def get_storage_key(self, gaddr: int) -> int:
        return self._skeys(abi.KVM_S390_GET_SKEYS, gaddr)

    def close(self) -> None:
        os.close(self.vm)
        os.close(self.kvm)
        self.map.close()


@pytest.fixture
def real_vm() -> Iterator[RealVm]:
    if os.environ.get("INDICATORS_REAL_KVM") != "1" or platform.machine() != "s390x":
        pytest.skip("needs an s390x KVM host and INDICATORS_REAL_KVM=1")
    vm = RealVm()
    yield vm
    vm.close()


def run_core_cases(rig: MemopRig) -> int:
    """Run the conformance suite's core cases on ``rig``; return how many ran."""
    ran = 0
    for case, table in conformance.CORE_CASES:
        for params in table:
            for page in range(4):  # what the cases use: start from key 0 and zeroes
                rig.set_storage_key(page * abi.PAGE_SIZE, 0)
            rig.poke(0, bytes(4 * abi.PAGE_SIZE))
            try:
                case(memop_rig=rig, **params)
            except AssertionError as exc:
                raise AssertionError(f"{case.__name__}{params}: {exc}") from exc
            ran += 1
    return ran


def test_core_cases_run_on_the_emulated_kernel(emulated_backend: EmulatedBackend) -> None:
    """Keeps the driver of the real-KVM test below working on hosts without KVM."""
    assert run_core_cases(emulated_rig("kvm-upstream", emulated_backend)) > 300


@pytest.mark.kvm
def test_real_kvm_conformance_core_cases(real_vm: RealVm) -> None:
    backend = KvmBackend(real_vm.vm, abi_version="auto")
    rig = MemopRig(
        name=f"real-kvm-{backend.abi}",
        backend=backend,
        abi=backend.abi,
        memory_size=REAL_MEMORY,
        peek=real_vm.peek,
        poke=real_vm.poke,
        set_storage_key=real_vm.set_storage_key,
        get_storage_key=real_vm.get_storage_key,
        emulated=None,
    )
    assert run_core_cases(rig) > 300
