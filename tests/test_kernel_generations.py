"""The two kernel generations through the public API, and the daemon not depending on them.

docs/kernel-generations.md lists the differences; the conformance suite
(test_memop_conformance.py) checks each one on every backend.  Here: the
acceptance example of issue 14, that the engine gives the same answer on
both generations for every error that is not transient, and that the
daemon reports the generation it runs on.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import daemon_config, qmp_client

from indicators.adapters import build_model
from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.engine import Engine, NotifyError
from indicators.memop import (
    GENERATIONS,
    EmulatedBackend,
    FaultInjector,
    KvmBackend,
    MemopBackend,
    MemopError,
    ProgramException,
)
from indicators.memop.kernel import EmulatedKvm
from indicators.sinks import QueueSink

MEMORY = 1 << 16


# ------------------------------------------------ the acceptance example (public API)


@pytest.mark.parametrize("through", ["emulation", "kvm backend"])
def test_size_2_at_an_odd_address_past_memory(through: str) -> None:
    """6.3: program exception 5 (memslot first); 7.0: EINVAL (alignment first)."""
    outcomes: dict[str, tuple[str, int | None]] = {}
    for kernel in GENERATIONS:
        with EmulatedBackend(MEMORY, kernel=kernel) as emulated:
            backend: MemopBackend = emulated
            if through == "kvm backend":
                backend = KvmBackend(-1, ioctl=EmulatedKvm(emulated))
            with pytest.raises(MemopError) as info:
                backend.cmpxchg(MEMORY + 1, 2, 0, 1)
            error = info.value
            if isinstance(error, ProgramException):
                outcomes[kernel] = ("pgm", error.code)
            else:
                outcomes[kernel] = ("errno", error.errno)
    assert outcomes == {"6.3": ("pgm", 5), "7.0": ("errno", errno.EINVAL)}


def test_the_default_generation_is_6_3() -> None:
    with EmulatedBackend(MEMORY) as backend:
        assert backend.kernel == backend.generation == "6.3"


# ---------------------------------- the engine does not depend on the generation


def virtio(key: int | None = None) -> dict[str, Any]:
    device = {"name": "net0", "kind": "virtio-ccw", "summary_indicator": 0x100,
              "device_indicator": 0x1200, "vectors": 8}  # fmt: skip
    if key is not None:
        device["key"] = key
    return device


def engine_on(backend: EmulatedBackend, device: dict[str, Any]) -> tuple[Engine, QueueSink]:
    config = parse_config({"backend": {"kind": "emulated", "memory_size": MEMORY},
                           "devices": [device]})  # fmt: skip
    sink = QueueSink()
    return Engine(build_model(config), backend, sink), sink


#: A failure that is not transient, set up on a fresh backend: -> the engine's code.
#: The code is the kernel's, and the same on both generations.
NON_TRANSIENT: dict[str, str] = {
    "protection by key": "4",
    "protection forced": "4",
    "read-only memslot": errno.errorcode[errno.EOPNOTSUPP],  # ENOTSUP on Linux
}


def _arrange(backend: EmulatedBackend, case: str) -> dict[str, Any]:
    if case == "protection by key":
        backend.set_storage_key(0x0, 0x50)  # the summary page matches the device key 5,
        backend.set_storage_key(0x1000, 0x30)  # the DSCI page has ACC 3
        return virtio(key=5)
    if case == "protection forced":
        backend.faults = FaultInjector()
        backend.faults.protect(0x1200, 1)
        return virtio()
    backend.set_readonly(0x1000, 0x1000)
    return virtio()


@pytest.mark.parametrize("case", NON_TRANSIENT)
@pytest.mark.parametrize("kernel", GENERATIONS)
async def test_engine_failure_is_the_same_on_both_generations(kernel: str, case: str) -> None:
    with EmulatedBackend(MEMORY, kernel=kernel) as backend:  # type: ignore[arg-type]
        engine, sink = engine_on(backend, _arrange(backend, case))
        before = backend.memory.snapshot()
        with pytest.raises(NotifyError) as info:
            await engine.notify("net0", 1)
        assert info.value.code == NON_TRANSIENT[case]
        assert info.value.gaddr == 0x1200
        assert backend.memory.snapshot() == before, "expected nothing changed"
        assert sink.count == [0] * 8, "expected no interrupt"
        assert engine.stats.failures == {NON_TRANSIENT[case]: 1}
        assert engine.stats.applied == 0


@pytest.mark.parametrize("code", [errno.ENOMEM, errno.EFAULT, errno.EINTR])
async def test_engine_treats_7_0_faultin_errors_like_any_other(code: int) -> None:
    """The errors only 7.0 has fail a notification like a read-only memslot does: counted by
    name, nothing written; the next notification goes through."""
    with EmulatedBackend(MEMORY, kernel="7.0") as backend:
        backend.faults = FaultInjector(faultin_errors=[code])
        engine, sink = engine_on(backend, virtio())
        before = backend.memory.snapshot()
        with pytest.raises(NotifyError) as info:
            await engine.notify("net0", 1)
        name = errno.errorcode[code]
        assert info.value.code == name
        assert backend.memory.snapshot() == before and sink.count == [0] * 8
        assert engine.stats.failures == {name: 1}
        await engine.notify("net0", 1)
        assert backend.read(0x1200, 1) == b"\x40" and sum(sink.count) == 1


# --------------------------------------------------------- the daemon's report


@pytest.mark.parametrize("kernel", [None, *GENERATIONS])
async def test_daemon_reports_the_generation(tmp_path: Path, kernel: str | None) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    if kernel is not None:
        raw["backend"]["kernel"] = kernel
    service = Service(parse_config(raw, "<test>"))
    await service.start()
    try:
        async with qmp_client(service.socket_path) as client:
            version = await client.execute("query-version")
            stats = await client.execute("query-stats")
            await client.execute("notify", {"device": "net0", "vector": 1})
    finally:
        await service.stop(grace=1.0)
    expected = kernel or "6.3"
    assert version["package"].endswith(f"(kernel {expected})")
    assert stats["kernel-generation"] == expected


@pytest.mark.parametrize("kernel", ["6.2", "7", "", 7.0])
def test_config_refuses_an_unknown_generation(kernel: object) -> None:
    raw = {"backend": {"kind": "emulated", "memory_size": MEMORY, "kernel": kernel},
           "devices": [virtio()]}  # fmt: skip
    with pytest.raises(Exception) as info:
        parse_config(raw, "<test>")
    assert "kernel" in str(info.value)
