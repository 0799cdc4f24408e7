"""Interrupt sinks: the engine delivering through KVM (over the emulated kernel)."""

from __future__ import annotations

from typing import Any

from indicators import abi
from indicators.adapters import build_model
from indicators.config import parse_config
from indicators.engine import Engine
from indicators.memop import EmulatedBackend, KvmBackend
from indicators.memop.kernel import EmulatedKvm
from indicators.sinks import KvmSink

VM_FD, FLIC_FD = 7, 8
DEVICES: list[dict[str, Any]] = [
    {"name": "net0", "kind": "virtio-ccw", "summary_indicator": 0x100,
     "device_indicator": 0x200, "vectors": 4, "isc": 3},
    {"name": "pci0", "kind": "zpci", "aisb": 0x110, "aibv": 0x210, "noi": 4, "isc": 2},
]  # fmt: skip


def engine_over_kvm(flic: int | None) -> tuple[Engine, EmulatedKvm, EmulatedBackend]:
    config = parse_config(
        {"backend": {"kind": "emulated", "memory_size": 1 << 16}, "devices": DEVICES}
    )
    memory = EmulatedBackend(1 << 16)
    kernel = EmulatedKvm(memory, "upstream")
    kvm = KvmBackend(VM_FD, abi_version="auto", ioctl=kernel)
    return Engine(build_model(config), kvm, KvmSink(kvm, flic)), kernel, memory


async def test_without_a_flic_every_adapter_gets_kvm_s390_interrupt() -> None:
    engine, kernel, memory = engine_over_kvm(None)
    await engine.notify("net0", 1)
    await engine.notify("pci0", 0)
    assert memory.read(0x200, 1) == b"\x40" and memory.read(0x100, 1) == b"\x01"
    io = abi.kvm_s390_int_io(1, 0, 0, 0)
    assert kernel.interrupts == [(io, 0, 0x80000000 | 3 << 27), (io, 0, 0x80000000 | 2 << 27)]
    assert kernel.device_attrs == []
    engine.set_ais_mode(2, abi.KVM_S390_AIS_MODE_SINGLE)  # the engine suppresses itself
    assert engine.simm == 0x80 >> 2


async def test_with_a_flic_suppressible_adapters_use_airq_inject_and_aism() -> None:
    engine, kernel, _ = engine_over_kvm(FLIC_FD)
    engine.set_ais_mode(2, abi.KVM_S390_AIS_MODE_SINGLE)
    ((group, attr, addr),) = kernel.device_attrs
    assert (group, attr) == (abi.KVM_DEV_FLIC_AISM, 0) and addr, "a kvm_s390_ais_req pointer"
    assert engine.simm == 0, "the kernel applies suppression, not the engine"
    await engine.notify("pci0", 3)
    await engine.notify("net0", 0)
    pci_adapter = 1 << 3 | 2
    assert kernel.device_attrs[1] == (abi.KVM_DEV_FLIC_AIRQ_INJECT, pci_adapter, 0)
    assert len(kernel.interrupts) == 1, "virtio is not suppressible: KVM_S390_INTERRUPT"


class FlicKernel(EmulatedKvm):
    """The emulated kernel plus the FLIC's AIS state, as arch/s390/kvm/interrupt.c keeps it:
    AISM ALL clears simm and nimm, SINGLE sets simm and clears nimm; AIRQ_INJECT of a
    suppressible adapter is dropped while nimm is set, and sets nimm when simm is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.simm = self.nimm = 0
        self.delivered: list[int] = []  # adapter ids the kernel injected

    def __call__(self, fd: int, request: int, arg: int) -> int:
        if request == abi.KVM_SET_DEVICE_ATTR:
            attr = abi.KvmDeviceAttr.from_address(arg)
            if attr.group == abi.KVM_DEV_FLIC_AISM:
                req = abi.KvmS390AisReq.from_address(attr.addr)  # read while it is alive
                mask = 0x80 >> req.isc
                self.nimm &= ~mask
                self.simm = self.simm & ~mask if req.mode == 0 else self.simm | mask
            elif attr.group == abi.KVM_DEV_FLIC_AIRQ_INJECT:
                mask = 0x80 >> (attr.attr & 7)
                if not self.nimm & mask:
                    self.delivered.append(attr.attr)
                    if self.simm & mask:
                        self.nimm |= mask
        return super().__call__(fd, request, arg)


async def test_reset_adapter_clears_the_kernels_ais_state_through_aism_all() -> None:
    config = parse_config(
        {"backend": {"kind": "emulated", "memory_size": 1 << 16}, "devices": DEVICES}
    )
    memory = EmulatedBackend(1 << 16)
    kernel = FlicKernel(memory, "upstream")
    kvm = KvmBackend(VM_FD, abi_version="auto", ioctl=kernel)
    engine = Engine(build_model(config), kvm, KvmSink(kvm, FLIC_FD))
    pci_adapter = 1 << 3 | 2

    async def fresh_interrupt() -> None:
        memory.write(0x110, b"\x00")  # the guest consumed the summary
        await engine.notify("pci0", 0)

    engine.set_ais_mode(2, abi.KVM_S390_AIS_MODE_SINGLE)
    await fresh_interrupt()
    await fresh_interrupt()
    assert kernel.delivered == [pci_adapter], "the kernel suppressed the second one"
    assert kernel.nimm == 0x80 >> 2
    engine.reset_isc(2)  # what reset-adapter calls
    assert kernel.device_attrs[-1][:2] == (abi.KVM_DEV_FLIC_AISM, 0)
    assert (kernel.simm, kernel.nimm) == (0, 0), "AISM mode ALL for isc 2 reached the kernel"
    await fresh_interrupt()
    await fresh_interrupt()
    assert kernel.delivered == [pci_adapter] * 3, "mode ALL: never suppressed again"


async def test_reset_adapter_without_a_flic_clears_the_engines_masks_only() -> None:
    engine, kernel, _ = engine_over_kvm(None)
    engine.set_ais_mode(2, abi.KVM_S390_AIS_MODE_SINGLE)
    engine.nimm = 0x80 >> 2
    engine.reset_isc(2)
    assert (engine.simm, engine.nimm) == (0, 0) and kernel.device_attrs == []
