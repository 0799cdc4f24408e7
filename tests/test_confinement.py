"""Write confinement, end to end: whatever clients send, only configured bits change.

A property test over random configs and random command streams sent through
the daemon's real control socket: the whole guest memory (random bytes,
configured indicator and summary bytes zeroed) is compared before and after,
and every changed bit must be a configured dsci or summary bit.  Each example
also checks its own teeth: every acknowledged notification's bit is set
afterwards (nothing clears bits here), the opening notifications of devices
whose key the (key 0) pages accept were acknowledged, and every refusal is
one the daemon owes (a bad device or vector, protection for key 3), never
the write guard's EPERM, which would mean the engine aimed outside.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
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


def _dsci_bit(device: dict[str, Any], vector: int) -> tuple[int, int]:
    """``(gaddr, mask)`` of a raw device's ``vector`` bit, from its fields (MSB-0)."""
    first = {
        "virtio-ccw": lambda d: d["device_indicator"] * 8 + d.get("ind_bit", 0),
        "zpci": lambda d: d["aibv"] * 8 + d.get("aibvo", 0),
        "kvm-route": lambda d: d["ind_addr"] * 8 + d.get("ind_offset", 0),
    }[device["kind"]](device)
    number = first + vector
    return number // 8, 0x80 >> (number % 8)


#: What a refused command may say: a bad device, vector, adapter, ISC or mode, an
#: eventfd that is not there, or protection (code 4) for a key the page refuses.
OWED_REFUSALS = re.compile(
    r"unknown device|has vectors|is not one|unknown adapter|isc|mode|no eventfd|"
    r"Invalid parameter|should be|\(code 4\)"
)


async def _drive(
    config: Any, commands: list[tuple[str, Any, Any]]
) -> tuple[set[tuple[int, int]], list[str]]:
    """Run the opening and ``commands``; the acknowledged (device, vector) pairs by
    index and the refusals' texts."""
    service = Service(config)
    await service.start()
    acknowledged: set[tuple[int, int]] = set()
    refusals: list[str] = []
    try:
        client = QMPClient("confinement")
        await client.connect(service.socket_path)
        # Every device's first and last vector, then the random stream.
        opening = [("notify", i, [0, d.vector_count - 1]) for i, d in enumerate(config.devices)]
        for command, a, b in [*opening, *commands]:
            arguments = _arguments(command, a, b, config.devices)
            try:
                await client.execute(command, arguments)
            except ExecuteError as exc:
                refusals.append(f"{command} {arguments}: {exc}")
                continue
            if command == "notify" and arguments is not None and a < len(config.devices):
                vectors = arguments["vector"]
                for vector in vectors if isinstance(vectors, list) else [vectors]:
                    acknowledged.add((a, vector))
        await client.disconnect()
    finally:
        await service.stop(grace=1.0)
    return acknowledged, refusals


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
        acknowledged, refusals = asyncio.run(_drive(config, commands))
        with GuestMemory(MEMORY, ram) as memory:
            after = memory.snapshot()
        os.unlink(ram)
    devices = raw["devices"]
    unowed = [r for r in refusals if "EPERM" in r or not OWED_REFUSALS.search(r)]
    assert not unowed, f"refusals the daemon does not owe: {unowed[:3]}"
    unset = [
        (devices[i]["name"], v)
        for i, v in sorted(acknowledged)
        if not after[_dsci_bit(devices[i], v)[0]] & _dsci_bit(devices[i], v)[1]
    ]
    assert not unset, f"acknowledged but not in memory: {unset[:8]}"
    for index, device in enumerate(devices):
        if device["key"] in (None, 0):  # the pages keep storage key 0: these must land
            count = device.get("vectors", device.get("noi"))
            assert {(index, 0), (index, count - 1)} <= acknowledged, device["name"]
    outside = {
        gaddr: (before[gaddr], after[gaddr])
        for gaddr in range(MEMORY)
        if (before[gaddr] ^ after[gaddr]) & ~allowed.get(gaddr, 0)
    }
    assert not outside, f"changed outside the configured bits: {dict(list(outside.items())[:8])}"

