"""From a backend config section to a memop backend and an interrupt sink.

The emulated backend maps anonymous memory or a RAM file and delivers
interrupts to an in-process :class:`~indicators.sinks.QueueSink` (under TCG
nothing outside QEMU can interrupt the guest); the KVM backend acquires the
VM fd (and optionally the FLIC fd) from its source and injects through KVM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import EmulatedBackendConfig, KvmBackendConfig
from ..memop import EmulatedBackend, FaultInjector, KvmBackend, MemopBackend
from ..memop.vmfd import acquire_fd
from ..sinks import InterruptSink, KvmSink, QueueSink

__all__ = ["Wiring", "open_backend"]


@dataclass
class Wiring:
    """A backend, its sink, and the fds to close with them."""

    backend: MemopBackend
    sink: InterruptSink
    fds: list[int]

    def close(self) -> None:
        """Close the backend and the fds it borrowed."""
        self.backend.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def open_backend(
    config: EmulatedBackendConfig | KvmBackendConfig, ram_path: str | None = None
) -> Wiring:
    """Open what ``config`` describes; ``ram_path`` replaces ``ram = "auto"``."""
    if isinstance(config, EmulatedBackendConfig):
        path = ram_path if config.ram == "auto" else config.ram
        if config.ram == "auto" and path is None:
            raise ValueError("backend.ram = 'auto' needs the [vmm] link to find the RAM file")
        faults = None
        if config.faults is not None:
            faults = FaultInjector(
                eagain_probability=config.faults.eagain_probability,
                eagain_sizes=frozenset(config.faults.eagain_sizes),
                protected=[(start, start + size) for start, size in config.faults.protected],
                seed=config.faults.seed,
            )
        backend = EmulatedBackend(
            config.memory_size, path=path, faults=faults, kernel=config.kernel
        )
        try:
            for page, key in config.storage_keys.items():
                backend.set_storage_key(int(page, 0), key)
        except ValueError as exc:
            backend.close()
            raise ValueError(f"backend.storage_keys: {exc}") from None
        return Wiring(backend, QueueSink(), [])
    vm_fd = acquire_fd(config.vm_fd)
    fds = [vm_fd]
    try:
        kvm = KvmBackend(vm_fd, abi_version=config.abi)
        flic = None
        if config.flic_fd is not None:
            flic = acquire_fd(config.flic_fd, expect="anon_inode:kvm-device")
            fds.append(flic)
        return Wiring(kvm, KvmSink(kvm, flic), fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
