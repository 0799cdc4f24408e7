"""Write confinement, end to end: whatever clients send, only configured bits change.

A property test over random configs and random command streams sent through
the daemon's real control socket: the whole guest memory (random bytes,
configured indicator and summary bytes zeroed) is compared before and after,
and every changed bit must be a configured dsci or summary bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import LAYOUT, expected_bits, layout_config
from qemu.qmp import ExecuteError, QMPClient

from indicators.adapters import build_model
from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.guestmem import GuestMemory

MEMORY = 1 << 16
APPLIED: list[int] = []  # notifications applied per example, to check the test has teeth

COMMANDS = st.lists(
    st.one_of(
        # Mostly valid vectors (taken modulo the device's count), sometimes not.
        st.tuples(st.just("notify"), st.integers(0, 7), st.lists(st.integers(-2, 999), max_size=9)),
        st.tuples(st.just("set-ais-mode"), st.integers(-1, 8), st.sampled_from(["all", "single"])),
        st.tuples(st.just("reset-adapter"), st.integers(0, 64), st.none()),
        st.tuples(st.just("query-adapters"), st.none(), st.none()),
        st.tuples(st.just("detach-eventfd"), st.integers(0, 7), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=25,
)


def _arguments(command: str, a: Any, b: Any, devices: list[Any]) -> dict[str, Any] | None:
    names = [device.name for device in devices]
    if command == "notify":
        if a >= len(devices):
            return {"device": f"ghost{a}", "vector": b}
        count = devices[a].vector_count
        vectors = [v if v < 0 or v % 7 == 0 else v % count for v in b]
        return {"device": names[a], "vector": vectors if len(vectors) != 1 else vectors[0]}
    if command == "set-ais-mode":
        return {"isc": a, "mode": b}
    if command == "reset-adapter":
        return {"adapter": a}
    if command == "detach-eventfd":
        return {"device": names[a] if a < len(names) else "ghost", "vector": b}
    return None


async def _drive(config: Any, commands: list[tuple[str, Any, Any]]) -> None:
    service = Service(config)
    await service.start()
    try:
        client = QMPClient("confinement")
        await client.connect(service.socket_path)
        applied = 0
        # Every device's first and last vector, then the random stream.
        opening = [("notify", i, [0, d.vector_count - 1]) for i, d in enumerate(config.devices)]
        for command, a, b in [*opening, *commands]:
            with contextlib.suppress(ExecuteError):
                reply = await client.execute(command, _arguments(command, a, b, config.devices))
                applied += reply.get("applied", 0) if isinstance(reply, dict) else 0
        APPLIED.append(applied)
        await client.disconnect()
    finally:
        await service.stop(grace=1.0)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(layout=LAYOUT, commands=COMMANDS, seed=st.integers(0, 2**32 - 1))
def test_only_configured_bits_ever_change(
    layout: list[tuple[str, int, int, bool, int | None]],
    commands: list[tuple[str, Any, Any]],
    seed: int,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        ram = str(Path(directory) / "ram")
        raw = {
            "backend": {"kind": "emulated", "memory_size": MEMORY, "ram": ram},
            "control": {"socket": str(Path(directory) / "control.sock")},
            "devices": layout_config(layout),
        }
        config = parse_config(raw)
        allowed = expected_bits(raw["devices"])
        assert allowed == build_model(config).allowed_bits()
        before = bytearray(random.Random(seed).randbytes(MEMORY))
        for gaddr in allowed:
            before[gaddr] = 0
        with GuestMemory(MEMORY, ram, create=True) as memory:
            memory.write(0, bytes(before))
        asyncio.run(_drive(config, commands))
        with GuestMemory(MEMORY, ram) as memory:
            after = memory.snapshot()
        os.unlink(ram)
    outside = {
        gaddr: (before[gaddr], after[gaddr])
        for gaddr in range(MEMORY)
        if (before[gaddr] ^ after[gaddr]) & ~allowed.get(gaddr, 0)
    }
    assert not outside, f"changed outside the configured bits: {dict(list(outside.items())[:8])}"


def test_the_property_test_applied_notifications() -> None:
    assert sum(APPLIED) > 0, "the random commands should apply some notifications"
