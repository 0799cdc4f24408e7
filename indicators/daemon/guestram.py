"""The guest's RAM and storage keys, as the QEMU behind the VMM link hands them over.

With ``ram = "auto"`` the daemon maps whatever RAM the QEMU behind its
:class:`~indicators.daemon.vmm.VmmLink` has, again after every restart of
QEMU; the storage keys come from QEMU's ``dump-skeys``.  Neither trusts a
name QEMU reports (see :mod:`indicators.daemon.hostfiles`):

    ram = GuestRam(config.backend, vmm)
    wiring, path = await ram.map()          # at start
    mapped = await ram.map()                 # on reconnect: None if the same file
    await load_storage_keys(vmm, wiring.backend)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from ..config import EmulatedBackendConfig, KvmBackendConfig
from ..memop import EmulatedBackend, MemopBackend
from .hostfiles import open_guest_ram
from .loglimit import LogLimiter
from .vmm import VmmLink
from .wiring import Wiring, open_backend

__all__ = ["GuestRam", "load_storage_keys", "refresh_storage_keys_forever"]

log = logging.getLogger(__name__)

# A refresh fails the same way every few seconds when it fails at all.
_LIMITER = LogLimiter(burst=5, period=60.0)


class GuestRam:
    """Maps the RAM of the QEMU behind ``vmm``; remembers which file it mapped."""

    def __init__(self, backend: EmulatedBackendConfig | KvmBackendConfig, vmm: VmmLink) -> None:
        self.backend = backend
        self.vmm = vmm
        #: (st_dev, st_ino) of the file mapped last.
        self.identity: tuple[int, int] | None = None

    async def map(self) -> tuple[Wiring, str] | None:
        """Map QEMU's RAM now: the wiring and the name QEMU gave; None when it is the
        file mapped already.  :class:`~indicators.daemon.hostfiles.HostFileError`
        when QEMU's answer does not lead to its own RAM."""
        path = await self.vmm.ram_path()
        peer = self.vmm.peer()
        fd = open_guest_ram(
            path, self.backend.memory_size, peer.pid if peer else None, peer.uid if peer else None
        )
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == self.identity:
                return None
            # The mapping is made through our fd, whatever the name leads to by now.
            wiring = open_backend(self.backend, f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if isinstance(wiring.backend, EmulatedBackend):
            wiring.backend.memory.path = path  # the name QEMU gave, for reports
        self.identity = info.st_dev, info.st_ino
        return wiring, path


#: Storage keys applied per loop pass: a refresh of a big guest's keys must
#: not stall notifications for the whole of it.
_SKEYS_PER_PASS = 2048


async def load_storage_keys(vmm: VmmLink, backend: MemopBackend | None) -> int:
    """Load the guest's storage keys from ``dump-skeys`` into an emulated backend.

    Returns how many pages it set; a failure is logged (rate-limited) and
    counts as 0.
    """
    if not isinstance(backend, EmulatedBackend):
        return 0
    try:
        keys = await vmm.storage_keys(backend.memory_size >> 12)
    except (RuntimeError, OSError, ValueError) as exc:
        _LIMITER.warning(log, "skeys", "dump-skeys failed: %s", exc)
        return 0
    for count, (page, key) in enumerate((keys or {}).items(), 1):
        with contextlib.suppress(ValueError):
            backend.set_storage_key(page << 12, key & 0xFE)
        if not count % _SKEYS_PER_PASS:
            await asyncio.sleep(0)  # a big guest's keys must not hold notifications up
    return len(keys or {})


async def refresh_storage_keys_forever(
    vmm: VmmLink, backend: Callable[[], MemopBackend | None], interval: float
) -> None:
    """Reload the keys every ``interval`` seconds into ``backend()`` (the current one);
    any failure is logged (rate-limited) and tried again: never a silently dead task."""
    while True:
        try:
            await load_storage_keys(vmm, backend())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LIMITER.warning(log, "skeys", "storage-key refresh failed: %r", exc)
        await asyncio.sleep(interval)
