"""Write confinement with devices that come and go: a removed device's bits stay as they were.

The property test of ``test_confinement.py`` with ``device-add``,
``device-del`` and ``guest-reset`` in the random command stream, through the
daemon's real control socket: some devices of a random layout come from the
config, the others are added at run time with a random lifetime.  The whole
guest memory (random bytes, indicator and summary bytes zeroed) is compared
before and after; every changed bit must belong to a device of the layout,
and a bit only one device owns never changes after that device was removed
(a removed device is not added again in a stream).
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

from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.guestmem import GuestMemory

MEMORY = 1 << 16
REMOVED: list[int] = []  # removals per example, to check the test has teeth

COMMANDS = st.lists(
    st.one_of(
        st.tuples(st.just("notify"), st.integers(0, 6), st.lists(st.integers(-1, 99), max_size=4)),
        st.tuples(
            st.just("device-add"), st.integers(0, 6), st.sampled_from(["guest", "persistent"])
        ),
        st.tuples(st.just("device-del"), st.integers(0, 6), st.none()),
        st.tuples(st.just("guest-reset"), st.none(), st.none()),
    ),
    min_size=1,
    max_size=30,
)


def _own_bits(devices: list[dict[str, Any]]) -> dict[str, dict[int, int]]:
    """Per device, ``{gaddr: mask}`` of the bits no other device of the layout has."""
    own = {}
    for device in devices:
        others = expected_bits([d for d in devices if d is not device])
        mine = expected_bits([device])
        own[device["name"]] = {
            gaddr: mask & ~others.get(gaddr, 0)
            for gaddr, mask in mine.items()
            if mask & ~others.get(gaddr, 0)
        }
    return own


def _vector_count(device: dict[str, Any]) -> int:
    return int(device.get("vectors") or device.get("noi") or 1)


async def _drive(
    config: Any, devices: list[dict[str, Any]], commands: list[tuple[str, Any, Any]]
) -> dict[str, dict[int, int]]:
    """Run the stream; per removed device, its own bits' values when it was removed."""
    service = Service(config)
    await service.start()
    own = _own_bits(devices)
    at_removal: dict[str, dict[int, int]] = {}

    def removed(name: str) -> None:
        read = service.engine.backend.read
        at_removal[name] = {gaddr: read(gaddr, 1)[0] & mask for gaddr, mask in own[name].items()}

    try:
        client = QMPClient("confinement-live")
        await client.connect(service.socket_path)
        for command, a, b in commands:
            device = devices[a % len(devices)] if a is not None else None
            with contextlib.suppress(ExecuteError):
                if command == "notify" and device is not None:
                    count = _vector_count(device)
                    # Valid vectors, unless the first is negative (then the notify is refused).
                    vectors = [v if b[0] < 0 else v % count for v in b] or [0]
                    await client.execute("notify", {"device": device["name"], "vector": vectors})
                elif command == "device-add" and device is not None:
                    if device["name"] not in at_removal:  # never added again once removed
                        await client.execute("device-add", {**device, "lifetime": b})
                elif command == "device-del" and device is not None:
                    await client.execute("device-del", {"name": device["name"]})
                    removed(device["name"])
                elif command == "guest-reset":
                    reply = await client.execute("guest-reset")
                    for name in reply["dropped"]:
                        removed(name)
        await client.disconnect()
    finally:
        await service.stop(grace=1.0)
    return at_removal


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    layout=LAYOUT,
    split=st.integers(0, 6),
    commands=COMMANDS,
    seed=st.integers(0, 2**32 - 1),
)
def test_a_removed_devices_bits_never_change_and_nothing_outside_the_layout_does(
    layout: list[tuple[str, int, int, bool, int | None]],
    split: int,
    commands: list[tuple[str, Any, Any]],
    seed: int,
) -> None:
    devices = layout_config(layout)
    for device in devices:
        if device["key"] is None:
            del device["key"]  # as a config file would leave it out
    with tempfile.TemporaryDirectory() as directory:
        ram = str(Path(directory) / "ram")
        raw = {
            "backend": {"kind": "emulated", "memory_size": MEMORY, "ram": ram},
            "control": {"socket": str(Path(directory) / "control.sock")},
            "devices": devices[:split],
        }
        config = parse_config(raw)
        allowed = expected_bits(devices)
        before = bytearray(random.Random(seed).randbytes(MEMORY))
        for gaddr in allowed:
            before[gaddr] = 0
        with GuestMemory(MEMORY, ram, create=True) as memory:
            memory.write(0, bytes(before))
        at_removal = asyncio.run(_drive(config, devices, commands))
        with GuestMemory(MEMORY, ram) as memory:
            after = memory.snapshot()
        os.unlink(ram)
    REMOVED.append(len(at_removal))
    outside = {
        gaddr: (before[gaddr], after[gaddr])
        for gaddr in range(MEMORY)
        if (before[gaddr] ^ after[gaddr]) & ~allowed.get(gaddr, 0)
    }
    assert not outside, f"changed outside the layout's bits: {dict(list(outside.items())[:8])}"
    own = _own_bits(devices)
    for name, values in at_removal.items():
        now = {gaddr: after[gaddr] & mask for gaddr, mask in own[name].items()}
        assert now == values, f"device {name!r} changed after its removal: {values} -> {now}"


def test_the_property_test_removed_devices() -> None:
    assert sum(REMOVED) > 0, "the random commands should remove some devices"
