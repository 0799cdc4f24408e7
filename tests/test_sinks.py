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
