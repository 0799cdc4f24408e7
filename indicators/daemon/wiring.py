"""From a backend config section to a memop backend and an interrupt sink.

The emulated backend maps anonymous memory or a RAM file and delivers
interrupts to an in-process :class:`~indicators.sinks.CountingSink` (under TCG
nothing outside QEMU can interrupt the guest); the KVM backend acquires the
VM fd (and optionally the FLIC fd) from its source and injects through KVM.

Failures are typed: a backend section that breaks the config rules raises
:class:`~indicators.config.ConfigError` (the same messages ``indicators
config check`` prints, from :mod:`indicators.config_rules`); a RAM file that
cannot be opened or mapped :class:`~indicators.errors.ResourceError`; the
KVM side :class:`~indicators.memop.KvmUnavailableError` or
:class:`~indicators.memop.vmfd.VmFdError`.  A RAM file this wiring created
is removed again by :meth:`Wiring.discard` (a start that failed must not
leave a guest-sized file behind).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .. import config_rules
from ..config import ConfigError, EmulatedBackendConfig, KvmBackendConfig
from ..errors import ResourceError
from ..memop import EmulatedBackend, FaultInjector, KvmBackend, MemopBackend
from ..memop.kvm import require_s390x_kvm
from ..memop.vmfd import acquire_fd
from ..sinks import CountingSink, InterruptSink, KvmSink

__all__ = ["Wiring", "open_backend"]


@dataclass
class Wiring:
    """A backend, its sink, the fds to close with them, and a RAM file it created."""

    backend: MemopBackend
    sink: InterruptSink
    fds: list[int]
    #: The RAM file :func:`open_backend` created (it did not exist before), if any.
    created: str | None = None

    def close(self) -> None:
        """Close the backend and the fds it borrowed."""
        self.backend.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def discard(self) -> None:
        """Close, and remove the RAM file this wiring created: undo a failed start."""
        self.close()
        if self.created is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.created)
            self.created = None


def open_backend(
    config: EmulatedBackendConfig | KvmBackendConfig, ram_path: str | None = None
) -> Wiring:
    """Open what ``config`` describes; ``ram_path`` replaces ``ram = "auto"``."""
    if isinstance(config, EmulatedBackendConfig):
        return _open_emulated(config, ram_path)
    # Before touching any fd source: on a host without s390x KVM nothing below can work.
    require_s390x_kvm()
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


def _open_emulated(config: EmulatedBackendConfig, ram_path: str | None) -> Wiring:
    path = ram_path if config.ram == "auto" else config.ram
    # The config rules again, for a Config that did not come through parse_config.
    problems = config_rules.backend_problems(config, has_vmm=ram_path is not None)
    if problems:
        raise ConfigError("backend", problems)
    if config.ram == "auto" and path is not None:
        problem = config_rules.ram_file_problem(path, config.memory_size)
        if problem is not None:
            raise ResourceError("RAM file", path, problem, action="map")
    faults = None
    if config.faults is not None:
        faults = FaultInjector(
            eagain_probability=config.faults.eagain_probability,
            eagain_sizes=frozenset(config.faults.eagain_sizes),
            protected=[(start, start + size) for start, size in config.faults.protected],
            seed=config.faults.seed,
        )
    created = path if path is not None and not os.path.lexists(path) else None
    try:
        backend = EmulatedBackend(
            config.memory_size, path=path, faults=faults, kernel=config.kernel
        )
    except OSError as exc:
        if created is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(created)
        raise ResourceError.from_os_error(
            "RAM file", path or "(anonymous)", exc, action="map"
        ) from None
    for page, key in config.storage_keys.items():
        backend.set_storage_key(int(page, 0), key)  # checked above
    return Wiring(backend, CountingSink(), [], created)
