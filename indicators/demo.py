"""``indicators demo``: the embedded default, end to end, with live progress.

It runs the real service on the emulated backend (anonymous guest memory),
a :class:`~indicators.simguest.SimulatedGuest` consuming indicators in a
thread as Linux's airq handler would, and several ``qemu.qmp`` clients
sending ``notify`` commands through the real control socket.  At the end it
judges, from the clients' and the guest's side only (a
:class:`~indicators.testing.oracle.DeliveryOracle`), that every acknowledged
notification reached the guest, and prints the statistics.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from typing import Any, NamedTuple

from qemu.qmp import ExecuteError, QMPClient

from .config import Config, parse_config
from .daemon.service import Service
from .memop import EmulatedBackend
from .simguest import SimulatedGuest
from .statusview import format_status
from .testing.oracle import DeliveryOracle, Verdict, oracle_for, rounds_settle

__all__ = ["DEMO_CONFIG", "demo_config", "run_demo"]

#: The embedded default: 4 virtio-ccw devices on ISC 3 sharing a summary
#: byte, 2 zPCI functions on ISC 2 with single-bit summaries, and a KVM route.
DEMO_CONFIG: dict[str, Any] = {
    "backend": {"kind": "emulated", "memory_size": "16M"},
    "devices": [
        *(
            {
                "name": f"virtio-net{i}",
                "kind": "virtio-ccw",
                "summary_indicator": 0x10000,
                "device_indicator": 0x10100 + 8 * i,
                "vectors": 8,
                "isc": 3,
            }
            for i in range(4)
        ),
        *(
            {
                "name": f"pci{i}",
                "kind": "zpci",
                "aisb": 0x10010,
                "aisbo": i,
                "aibv": 0x10200 + 16 * i,
                "noi": 32,
                "isc": 2,
            }
            for i in range(2)
        ),
        {
            "name": "route0",
            "kind": "kvm-route",
            "summary_addr": 0x10020,
            "ind_addr": 0x10300,
            "vectors": 4,
            "adapter_id": 0x40,
            "isc": 5,
        },
    ],
}


def demo_config(socket_path: str) -> Config:
    """The embedded default with its control socket at ``socket_path``."""
    return parse_config({**DEMO_CONFIG, "control": {"socket": socket_path}}, "<demo>")


def _oracle(config: Config, backend: EmulatedBackend, guest: SimulatedGuest) -> DeliveryOracle:
    """The delivery oracle over the guest's memory and counters; bits from the config."""
    bits = {(d.name, v): n for d in config.devices for v, n in enumerate(d.dsci_bits())}

    def bit_of(device: str, vector: int) -> tuple[int, int]:
        number = bits[(device, vector)]
        return number >> 3, 0x80 >> (number & 7)

    settle = rounds_settle(lambda: guest.rounds)
    return oracle_for(backend.memory.load, bit_of, guest.counts, settle=settle)


async def _client(
    path: str, config: Config, deadline: float, oracle: DeliveryOracle, batch: int
) -> None:
    rng = random.Random()
    devices = [(d.name, d.vector_count) for d in config.devices]
    client = QMPClient("demo")
    await client.connect(path)
    try:
        while time.monotonic() < deadline:
            name, vectors = rng.choice(devices)
            # Distinct vectors: the daemon counts a repeated vector once.
            chosen = rng.sample(range(vectors), rng.randint(1, min(batch, vectors)))
            tokens = oracle.submit_many((name, vector) for vector in chosen)
            try:
                await client.execute("notify", {"device": name, "vector": chosen})
            except ExecuteError as exc:
                # Which ones failed is in NOTIFY_FAILED events; the demo expects none.
                for token in tokens:
                    oracle.failed(token, exc.error_class)
                continue
            for token in tokens:
                oracle.acknowledged(token)
    finally:
        await client.disconnect()


def _progress(start: float, sent: int, service: Service, guest: SimulatedGuest) -> str:
    stats = service.engine.stats
    per = stats.cmpxchg / stats.applied if stats.applied else 0.0
    return (f"t={time.monotonic() - start:5.1f}s  acknowledged {sent:>9,}  applied "
            f"{stats.applied:>9,}  cmpxchg/notify {per:5.3f}  interrupts "
            f"{stats.interrupts_injected:>7,}  guest consumed {guest.total:>8,}")  # fmt: skip


async def run_demo(seconds: float = 5.0, rate: int = 16, clients: int = 4) -> int:
    """Run the demo; returns 0 when every acknowledged notification was consumed."""
    with tempfile.TemporaryDirectory(prefix="indicators-demo-") as tmp:
        path = os.path.join(tmp, "control.sock")
        config = demo_config(path)
        service = Service(config)
        await service.start()
        assert service.wiring is not None
        backend = service.wiring.backend
        assert isinstance(backend, EmulatedBackend)
        # The guest sleeps briefly when idle so that it does not starve the
        # event loop of the GIL (a real guest runs on its own CPU).
        guest = SimulatedGuest(backend.memory, service.model, idle_sleep=0.0005)
        guest.start()
        service.engine.set_counts = Counter()  # for the closing arithmetic only
        oracle = _oracle(config, backend, guest)
        print(f"indicators demo: {len(config.devices)} devices, emulated backend, simulated "
              f"guest, {clients} QMP clients on {path}")  # fmt: skip
        start = time.monotonic()
        workers = [
            asyncio.create_task(_client(path, config, start + seconds, oracle, rate))
            for _ in range(clients)
        ]
        tty = sys.stdout.isatty()
        while not all(w.done() for w in workers):
            await asyncio.sleep(0.5)
            line = _progress(start, oracle.acknowledged_count, service, guest)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        await asyncio.gather(*workers)
        await service.engine.drain()
        guest.stop()
        print(("\r" if tty else "") + _progress(start, oracle.acknowledged_count, service, guest))
        adapters = service.describe_adapters()
        stats = service.describe_stats()
        await service.stop()
    verdict = oracle.verdict()
    counters = service.engine.stats
    arithmetic = _Arithmetic(
        applied=counters.applied,
        set_bits=sum((service.engine.set_counts or Counter()).values()),
        failed=sum(counters.failures.values()),
    )
    print()
    print(format_status(adapters, stats))
    print()
    return _report(verdict, guest.total, arithmetic)


class _Arithmetic(NamedTuple):
    applied: int
    set_bits: int
    failed: int


def _report(verdict: Verdict, consumed: int, counts: _Arithmetic) -> int:
    """Print the verdict; 0 when every acknowledged notification reached the guest
    and the engine's counters agree with what the clients saw."""
    ok = (
        verdict.ok
        and not verdict.failed
        and counts.applied == verdict.acknowledged
        and counts.failed == 0
    )
    # The closing arithmetic from the engine's counters: what the clients saw
    # acknowledged is what the engine applied, and each applied notification
    # either set a clear bit or merged into a bit that was still set.
    print(
        f"engine: {counts.applied:,} applied = {counts.set_bits:,} set a clear bit + "
        f"{counts.applied - counts.set_bits:,} merged into a set bit; {counts.failed:,} failed"
    )
    print(
        f"every acknowledged notification reached the guest: {'yes' if ok else 'NO'} "
        f"({verdict.acknowledged:,} acknowledged, {len(verdict.lost):,} lost, "
        f"{sum(verdict.failed.values()):,} failed; {consumed:,} bits consumed by the guest)"
    )
    if not ok:
        print(verdict)
    return 0 if ok else 1
