"""``indicators demo``: the embedded default, end to end, with live progress.

It runs the real service on the emulated backend (anonymous guest memory),
a :class:`~indicators.simguest.SimulatedGuest` consuming indicators in a
thread as Linux's airq handler would, and several ``qemu.qmp`` clients
sending ``notify`` commands through the real control socket.  At the end it
checks that every bit the engine set was consumed by the guest and prints
the statistics.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from qemu.qmp import QMPClient

from .config import Config, parse_config
from .daemon.service import Service
from .memop import EmulatedBackend
from .simguest import SimulatedGuest
from .statusview import format_status

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


async def _client(path: str, config: Config, deadline: float, sent: list[int], batch: int) -> None:
    rng = random.Random()
    devices = [(d.name, d.vector_count) for d in config.devices]
    client = QMPClient("demo")
    await client.connect(path)
    try:
        while time.monotonic() < deadline:
            name, vectors = rng.choice(devices)
            chosen = [rng.randrange(vectors) for _ in range(rng.randint(1, batch))]
            reply = await client.execute("notify", {"device": name, "vector": chosen})
            assert isinstance(reply, dict)
            sent[0] += int(reply["applied"])  # a repeated vector is one notification
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
        service.engine.set_counts = Counter()
        # The guest sleeps briefly when idle so that it does not starve the
        # event loop of the GIL (a real guest runs on its own CPU).
        guest = SimulatedGuest(backend.memory, service.model, idle_sleep=0.0005)
        guest.start()
        print(f"indicators demo: {len(config.devices)} devices, emulated backend, simulated "
              f"guest, {clients} QMP clients on {path}")  # fmt: skip
        start = time.monotonic()
        sent = [0]
        workers = [
            asyncio.create_task(_client(path, config, start + seconds, sent, rate))
            for _ in range(clients)
        ]
        tty = sys.stdout.isatty()
        while not all(w.done() for w in workers):
            await asyncio.sleep(0.5)
            line = _progress(start, sent[0], service, guest)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        await asyncio.gather(*workers)
        await service.engine.drain()
        guest.stop()
        print(("\r" if tty else "") + _progress(start, sent[0], service, guest))
        adapters = service.describe_adapters()
        stats = service.describe_stats()
        await service.stop()
    counters = service.engine.stats
    set_bits = sum((service.engine.set_counts or Counter()).values())
    failed = sum(counters.failures.values())
    # The closing arithmetic: what the clients saw acknowledged is what the
    # engine counts as applied, and each applied notification either set a
    # clear bit (the guest consumed each of those once) or merged into a set one.
    consumed_ok = guest.counts == service.engine.set_counts and sent[0] == counters.applied
    print()
    print(format_status(adapters, stats))
    print()
    verdict = "yes" if consumed_ok else "NO"
    print(
        f"every acknowledged notification reached the guest: {verdict} ({sent[0]:,} "
        f"acknowledged, {counters.applied:,} applied = {set_bits:,} set a clear bit "
        f"({guest.total:,} consumed by the guest) + {counters.applied - set_bits:,} merged "
        f"into a set bit; {failed:,} failed)"
    )
    return 0 if consumed_ok else 1
