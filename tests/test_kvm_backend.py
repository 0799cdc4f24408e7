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
from indicators.memop import (
    EmulatedBackend,
    FaultInjector,
    KvmBackend,
    KvmUnavailableError,
    MemopError,
    ProgramException,
    TransientError,
)
from indicators.memop.generations import generation_of_release
from indicators.memop.kernel import EmulatedKvm
from indicators.memop.kvm import EINTR_ATTEMPTS, IoctlFn, system_ioctl

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


# ------------------------------------------------ kernel generations, errnos


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.2.16-300.fc38.s390x", None),  # no cmpxchg memop yet
        ("6.3.0", "6.3"),
        ("6.19.2-1-default", "6.3"),
        ("7.0.0-rc3", "7.0"),
        ("7.4.1", "7.0"),
        ("10.0.0", "7.0"),
        ("not-a-release", None),
    ],
)
def test_generation_from_the_release_string(
    emulated_backend: EmulatedBackend, release: str, expected: str | None
) -> None:
    backend = KvmBackend(VM_FD, ioctl=EmulatedKvm(emulated_backend), release=release)
    assert backend.generation == expected
    assert generation_of_release(release) == expected


@pytest.mark.parametrize("kernel", ["6.3", "7.0"])
def test_generation_of_the_emulated_kernel(kernel: str) -> None:
    with EmulatedBackend(1 << 16, kernel=kernel) as emulated:  # type: ignore[arg-type]
        backend = KvmBackend(VM_FD, ioctl=EmulatedKvm(emulated))
        assert backend.release == f"{kernel}.0-emulated"
        assert backend.generation == kernel == emulated.generation


def test_emulated_backend_refuses_an_unknown_generation() -> None:
    with pytest.raises(ValueError, match=r"'6\.2' is not one of 6\.3, 7\.0"):
        EmulatedBackend(1 << 16, kernel="6.2")  # type: ignore[arg-type]


class Failing:
    """An ioctl whose MEM_OP fails with the errnos in ``plan`` (then passes through)."""

    def __init__(self, inner: IoctlFn, plan: list[int]) -> None:
        self.inner = inner
        self.plan = plan
        self.mem_ops = 0

    def __call__(self, fd: int, request: int, arg: int) -> int:
        if request == abi.KVM_S390_MEM_OP:
            self.mem_ops += 1
            if self.plan:
                code = self.plan.pop(0)
                raise OSError(code, os.strerror(code))
        return self.inner(fd, request, arg)


def _failing_backend(emulated: EmulatedBackend, plan: list[int]) -> tuple[KvmBackend, Failing]:
    fake = Failing(EmulatedKvm(emulated), [])
    backend = KvmBackend(VM_FD, abi_version="upstream", ioctl=fake)
    fake.plan = plan
    return backend, fake


@pytest.mark.parametrize("call", ["cmpxchg", "read", "write", "check"])
def test_eintr_is_retried_up_to_the_bound(emulated_backend: EmulatedBackend, call: str) -> None:
    emulated_backend.memory.write(0x100, bytes(8))
    calls = {
        "cmpxchg": lambda b: b.cmpxchg(0x100, 8, 0, 1),
        "read": lambda b: b.read(0x100, 8),
        "write": lambda b: b.write(0x100, b"\x01"),
        "check": lambda b: b.check(0x100, 8),
    }
    backend, fake = _failing_backend(emulated_backend, [errno.EINTR] * (EINTR_ATTEMPTS - 1))
    calls[call](backend)  # the last allowed attempt passes
    assert fake.mem_ops == EINTR_ATTEMPTS and backend.eintr_retries == EINTR_ATTEMPTS - 1

    emulated_backend.memory.write(0x100, bytes(8))
    backend, fake = _failing_backend(emulated_backend, [errno.EINTR] * EINTR_ATTEMPTS)
    with pytest.raises(MemopError) as info:
        calls[call](backend)
    assert info.value.errno == errno.EINTR and not isinstance(info.value, TransientError)
    assert "interrupted 4 times" in str(info.value)
    assert fake.mem_ops == EINTR_ATTEMPTS, "expected the bound, not one call more"
    assert emulated_backend.memory.read(0x100, 8) == bytes(8), "expected memory unchanged"


def test_eintr_retry_compares_against_the_callers_old_value(
    emulated_backend: EmulatedBackend,
) -> None:
    """A retried cmpxchg refills the old buffer, whatever the failed call left there."""
    emulated_backend.memory.write(0x100, (5).to_bytes(8, "big"))
    backend, fake = _failing_backend(emulated_backend, [errno.EINTR])
    inner = fake.__call__

    def scribbling(fd: int, request: int, arg: int) -> int:
        if request == abi.KVM_S390_MEM_OP and fake.plan:
            mop = abi.KvmS390MemOp.from_address(arg)
            ctypes.memmove(mop.old_addr, (5).to_bytes(8, "big"), 8)  # as a copy-back would
        return inner(fd, request, arg)

    backend._ioctl = scribbling
    result = backend.cmpxchg(0x100, 8, 4, 6)
    assert result.exchanged is False and result.old == 5, "expected the compare of 4 to fail"
    assert emulated_backend.memory.read(0x100, 8) == (5).to_bytes(8, "big"), (
        "expected memory unchanged: the retry must compare against 4, not the 5 left behind"
    )


@pytest.mark.parametrize("code", [errno.ENOMEM, errno.EFAULT, errno.EIO, errno.EOPNOTSUPP])
def test_other_errnos_are_memop_errors_with_the_errno(
    emulated_backend: EmulatedBackend, code: int
) -> None:
    backend, fake = _failing_backend(emulated_backend, [code])
    with pytest.raises(MemopError) as info:
        backend.cmpxchg(0x100, 8, 0, 1)
    assert info.value.errno == code and not isinstance(info.value, TransientError)
    assert fake.mem_ops == 1, "expected no retry"


@pytest.mark.parametrize("store", [True, False])
def test_check_marshalling(emulated_backend: EmulatedBackend, store: bool) -> None:
    recorder = Recorder(EmulatedKvm(emulated_backend))
    backend = KvmBackend(VM_FD, abi_version="upstream", ioctl=recorder)
    emulated_backend.set_storage_key(0x2000, 0x90)
    backend.check(0x2000, 300, 9, store=store)
    mop = recorder.calls[-1][2]
    assert isinstance(mop, abi.KvmS390MemOp)
    expected_op = abi.KVM_S390_MEMOP_ABSOLUTE_WRITE if store else abi.KVM_S390_MEMOP_ABSOLUTE_READ
    assert (mop.op, mop.gaddr, mop.size, mop.key, mop.buf) == (expected_op, 0x2000, 300, 9, 0)
    assert mop.flags == abi.KVM_S390_MEMOP_F_CHECK_ONLY | abi.KVM_S390_MEMOP_F_SKEY_PROTECTION


# ----------------------------------- the old buffer written back, per generation


def _raw_cmpxchg(
    kernel: EmulatedKvm, gaddr: int, size: int, old: int, new: int, key: int | None = None
) -> tuple[int | OSError, int]:
    """One upstream cmpxchg ioctl with an old buffer ``copy_to_user`` cannot write.

    Returns the result (or the OSError) and what the old buffer holds after.
    """
    old_buffer = ctypes.create_string_buffer(old.to_bytes(size, "big"), size)
    new_buffer = ctypes.create_string_buffer(new.to_bytes(size, "big"), size)
    start = ctypes.addressof(old_buffer)
    kernel.unwritable = [(start, start + size)]
    mop = abi.KvmS390MemOp(gaddr=gaddr, size=size, op=abi.KVM_S390_MEMOP_ABSOLUTE_CMPXCHG)
    mop.buf, mop.old_addr = ctypes.addressof(new_buffer), start
    if key is not None:
        mop.flags, mop.key = abi.KVM_S390_MEMOP_F_SKEY_PROTECTION, key
    result: int | OSError
    try:
        result = kernel(VM_FD, abi.KVM_S390_MEM_OP, ctypes.addressof(mop))
    except OSError as exc:
        result = exc
    return result, int.from_bytes(old_buffer.raw[:size], "big")


#: With an unwritable old buffer, which outcomes become EFAULT: 6.3 writes the
#: old buffer back after a failed compare, protection and EAGAIN only; 7.0
#: (``success = false`` up front) after everything but an exchange.
#: case -> (gaddr, size, old, key, outcome on 6.3, outcome on 7.0)
OLD_BUFFER_WRITTEN_BACK: dict[str, tuple[int, int, int, int | None, int, int]] = {
    "exchanged": (0x1100, 8, 0, None, 0, 0),
    "compare failed": (0x1100, 8, 1, None, -errno.EFAULT, -errno.EFAULT),
    "protection": (0x1100, 8, 0, 3, -errno.EFAULT, -errno.EFAULT),
    "addressing": (1 << 20, 8, 0, None, 5, -errno.EFAULT),
    "misaligned": (0x1101, 8, 0, None, -errno.EINVAL, -errno.EFAULT),
    "size not a power of two": (0x1100, 3, 0, None, -errno.EINVAL, -errno.EFAULT),
    "read-only memslot": (0x3000, 8, 0, None, -errno.EOPNOTSUPP, -errno.EFAULT),
}


@pytest.mark.parametrize("case", OLD_BUFFER_WRITTEN_BACK)
@pytest.mark.parametrize("kernel", ["6.3", "7.0"])
def test_old_buffer_written_back_per_generation(kernel: str, case: str) -> None:
    gaddr, size, old, key, on_6_3, on_7_0 = OLD_BUFFER_WRITTEN_BACK[case]
    with EmulatedBackend(1 << 16, kernel=kernel) as emulated:  # type: ignore[arg-type]
        emulated.set_storage_key(0x1000, 0x90)
        emulated.set_readonly(0x3000, 0x1000)
        result, after = _raw_cmpxchg(EmulatedKvm(emulated), gaddr, size, old, 0x42, key)
        expected = on_6_3 if kernel == "6.3" else on_7_0
        got = -result.errno if isinstance(result, OSError) and result.errno else result
        assert got == expected, f"{case} on {kernel}: expected {expected}, got {result!r}"
        assert after == old, "expected the unwritable old buffer unchanged"
        stored = (0x42).to_bytes(8, "big") if case == "exchanged" else bytes(8)
        assert emulated.memory.read(0x1100, 8) == stored


def test_old_buffer_written_back_on_eagain_in_both_generations() -> None:
    for kernel in ("6.3", "7.0"):
        with EmulatedBackend(1 << 16, kernel=kernel) as emulated:  # type: ignore[arg-type]
            emulated.faults = FaultInjector(eagain_probability=1.0)
            result, _ = _raw_cmpxchg(EmulatedKvm(emulated), 0x1100, 1, 0, 1)
            assert isinstance(result, OSError) and result.errno == errno.EFAULT, kernel


@pytest.mark.parametrize("kernel", ["6.3", "7.0"])
def test_v5_writes_the_old_buffer_back_only_after_a_failed_compare(kernel: str) -> None:
    """The v5 assumption: a 7.0-based v5 kernel keeps v5's copy-back rule."""
    with EmulatedBackend(1 << 16, kernel=kernel) as emulated:  # type: ignore[arg-type]
        fake = EmulatedKvm(emulated, "v5")
        backend = KvmBackend(VM_FD, abi_version="v5", ioctl=fake)
        with pytest.raises(ProgramException) as info:
            backend.cmpxchg(1 << 20, 8, 0x77, 0)
        assert info.value.old == 0x77, "expected the old buffer untouched after addressing"
        with pytest.raises(MemopError) as einval:
            backend.cmpxchg(0x1101, 8, 0x77, 0)
        assert einval.value.errno == errno.EINVAL and einval.value.old == 0x77
