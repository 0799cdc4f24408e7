"""Random device layouts for property tests: valid configs with no overlapping bits."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import strategies as st

__all__ = ["LAYOUT", "layout_config"]

LAYOUT = st.lists(
    st.tuples(
        st.sampled_from(["virtio-ccw", "zpci", "kvm-route"]),
        st.integers(1, 40),  # vectors
        st.integers(0, 7),  # first bit offset
        st.booleans(),  # share the previous device's summary
        st.sampled_from([None, 0, 3]),  # access key
    ),
    min_size=1,
    max_size=6,
)


def layout_config(layout: list[tuple[str, int, int, bool, int | None]]) -> list[dict[str, Any]]:
    """Place devices without overlaps: indicators from 0x2000, summaries from 0x1000."""
    devices: list[dict[str, Any]] = []
    cursor, summary = 0x2000 * 8, 0x1000 * 8
    for index, (kind, vectors, offset, share, key) in enumerate(layout):
        if not (share and devices and devices[-1]["kind"] == kind):
            summary += 8  # a byte of its own
        byte, bit = divmod(summary, 8)
        start = cursor + offset
        name = f"dev{index}"
        common: dict[str, Any] = {"name": name, "kind": kind, "key": key}
        if kind == "virtio-ccw":
            common.update(summary_indicator=byte, device_indicator=start // 8,
                          ind_bit=start % 8, vectors=vectors)  # fmt: skip
        elif kind == "zpci":
            common.update(aisb=byte, aisbo=bit, aibv=start // 8, aibvo=start % 8, noi=vectors,
                          isc=2)  # fmt: skip
        else:
            common.update(summary_addr=byte, summary_offset=bit, ind_addr=start // 8,
                          ind_offset=start % 8, vectors=vectors, adapter_id=40, isc=5)  # fmt: skip
        devices.append(common)
        cursor = start + vectors + random.Random(index).randrange(0, 64)
    return devices


def expected_bits(devices: list[dict[str, Any]]) -> dict[int, int]:
    """``{gaddr: mask}`` of every dsci and summary bit, worked out from the raw fields
    (MSB-0: bit n is byte n // 8, mask 0x80 >> n % 8), independently of the package."""
    bits: dict[int, int] = {}

    def add(number: int) -> None:
        bits[number // 8] = bits.get(number // 8, 0) | 0x80 >> (number % 8)

    for device in devices:
        if device["kind"] == "virtio-ccw":
            first, count = (
                device["device_indicator"] * 8 + device.get("ind_bit", 0),
                device["vectors"],
            )
            add(device["summary_indicator"] * 8 + 7)  # QEMU ORs 0x01
        elif device["kind"] == "zpci":
            first, count = device["aibv"] * 8 + device.get("aibvo", 0), device["noi"]
            add(device["aisb"] * 8 + device.get("aisbo", 0))
        else:
            first, count = device["ind_addr"] * 8 + device.get("ind_offset", 0), device["vectors"]
            add(device["summary_addr"] * 8 + device.get("summary_offset", 0))
        for number in range(first, first + count):
            add(number)
    return bits
