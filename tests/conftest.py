"""Shared fixtures, and what a test needs from the machine.

Needs: :func:`need` (a call) and the marker ``needs(condition, reason)``
skip a test whose machine lacks something (root, a tmpfs, /dev/kvm, QEMU,
the assembler) with the reason, but FAIL it when the environment variable
``CI`` is set: CI runs as root with /dev/kvm, QEMU and binutils, so a
missing need there is a broken runner, not a smaller suite.

Memop: ``memop_rig`` runs a test once per memop backend (the emulation, and
the KVM backend over the emulated kernel in each ABI), with the memory and
storage keys behind it at hand.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from attack_helpers import need_root, world_dir
from daemon_helpers import Client, qmp_client, start_service

from indicators.daemon.service import Service
from indicators.memop import EmulatedBackend, KvmBackend, MemopBackend
from indicators.memop.kernel import EmulatedKvm

# --------------------------------------------------------------------- needs


def need(condition: object, reason: str) -> None:
    """Go on when ``condition`` holds; else skip saying ``reason``, or fail with CI set."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``needs`` marker."""
    config.addinivalue_line(
        "markers", "needs(condition, reason): skip without condition; fail instead with CI set"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply every ``needs`` marker of ``item`` before its fixtures run."""
    for marker in item.iter_markers("needs"):
        condition = marker.args[0] if marker.args else marker.kwargs["condition"]
        reason = marker.args[1] if len(marker.args) > 1 else marker.kwargs["reason"]
        need(condition, reason)


# --------------------------------------------------------------------- memop

MEMOP_MEMORY_SIZE = 16 * 4096


@dataclass
class MemopRig:
    """A backend under test plus raw access to the guest it works on.

    ``peek``/``poke`` touch memory without keys or R/C, as a guest's own
    accesses would; ``emulated`` is the emulation behind the backend (None
    on a real KVM host).
    """

    name: str
    backend: MemopBackend
    abi: Literal["upstream", "v5"]
    memory_size: int
    peek: Callable[[int, int], bytes]
    poke: Callable[[int, bytes], None]
    set_storage_key: Callable[[int, int], None]
    get_storage_key: Callable[[int], int]
    emulated: EmulatedBackend | None


MEMOP_BACKENDS = ("emulated", "kvm-upstream", "kvm-v5")


def emulated_rig(name: str, emulated: EmulatedBackend) -> MemopRig:
    """A rig for ``name`` (one of :data:`MEMOP_BACKENDS`) over ``emulated``."""
    backend: MemopBackend
    abi: Literal["upstream", "v5"] = "v5" if name == "kvm-v5" else "upstream"
    if name == "emulated":
        backend = emulated
    else:
        backend = KvmBackend(-1, abi_version=abi, ioctl=EmulatedKvm(emulated, abi))
    return MemopRig(
        name=name,
        backend=backend,
        abi=abi,
        memory_size=emulated.memory_size,
        peek=emulated.memory.read,
        poke=emulated.memory.write,
        set_storage_key=emulated.set_storage_key,
        get_storage_key=emulated.get_storage_key,
        emulated=emulated,
    )


@pytest.fixture
def emulated_backend() -> Iterator[EmulatedBackend]:
    """A fresh 64 KiB emulated guest, every storage key 0."""
    with EmulatedBackend(MEMOP_MEMORY_SIZE) as backend:
        yield backend


@pytest.fixture(params=MEMOP_BACKENDS)
def memop_rig(request: pytest.FixtureRequest, emulated_backend: EmulatedBackend) -> MemopRig:
    """Each memop backend in turn, over a fresh emulated guest."""
    return emulated_rig(request.param, emulated_backend)


# ------------------------------------------------- an in-process daemon


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """A started :class:`Service` on :func:`daemon_helpers.daemon_config`, stopped after."""
    started = await start_service(tmp_path)
    yield started
    await started.stop(grace=1.0)


@pytest.fixture
async def client(service: Service) -> AsyncIterator[Client]:
    """A ``qemu.qmp`` client connected to :func:`service`'s control socket."""
    async with qmp_client(service.socket_path) as connected:
        yield connected


@pytest.fixture
def world() -> Iterator[Path]:
    """A root-owned directory other uids may traverse (the attacker tests; needs root)."""
    need_root()
    with world_dir() as path:
        yield path

