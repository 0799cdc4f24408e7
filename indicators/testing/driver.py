"""The airq guest as a driver: it picks its indicator areas at every boot.

In driver mode (on when the host writes the driver block at
:data:`DRIVER_GADDR` before the first boot) the guest keeps a boot counter in
that page, which neither QEMU's reset nor ``-kernel`` (it reloads only the
ELF segment) clears.  Boot ``n`` uses *slot* ``n mod slots``: the layout's
areas (the template, all inside slot 0 at ``slot_base``) shifted by
``(n mod slots) * slot_size``.  At every boot the guest

1. counts the bits the previous boot left set in its slot into the same
   per-vector counters (they run on across boots: nothing set is lost);
2. fills the previous slot with :data:`PATTERN` (it is ordinary memory now);
3. zeroes this boot's slot and publishes one registration record per area,
   shaped like virtio-ccw's SET_IND_ADAPTER payload (summary address,
   indicator address, indicator bit, ISC) plus the summary mask and the
   counter index of vector 0; ``published`` = the boot number comes last.

On REBOOT it counts the bytes of the previous slot that are not
:data:`PATTERN` (``stray``: nobody may write there during this boot) and
re-IPLs with ``diag 308`` subcode 3, which QEMU turns into a guest reset
request (SHUTDOWN reason ``guest-reset`` when its reboot action is
``shutdown``, as ``[vmm] manage_reboot`` sets it).

Driver block (big-endian): ``+0x00`` magic ``b"AIRQDRV1"``, ``+0x08 u32
slots``, ``+0x0c u32 boots`` (guest), ``+0x10 u64 slot_base``, ``+0x18 u64
slot_size``, ``+0x20 u32 published`` (guest), ``+0x28 u64 stray`` (all
checks), ``+0x30 u64 last_stray``, ``+0x38 u64 leftover`` (bits counted at
boot), ``+0x40 u64 checks``; records at ``+0x100``, 32 bytes each:
``u64 summary, u64 indicator, u64 ind_bit, u8 isc, u8 summary_mask, 2x,
u32 counter_base``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPClient

from indicators.guestmem import GuestMemory
from indicators.testing.errors import RigError
from indicators.testing.guest import FREE_GADDR, PAGE_SIZE, Area, Layout
from indicators.testing.layout import GuestLayout

__all__ = [
    "DRIVER_GADDR",
    "PATTERN",
    "DriverSlots",
    "DriverStats",
    "Registration",
    "device_for",
    "read_registrations",
    "read_stats",
    "register_records",
    "wait_published",
]

DRIVER_GADDR = 0x3000
PATTERN = 0xA5
MAGIC = b"AIRQDRV1"
_HEAD = struct.Struct(">8sIIQQ")
_STATS = struct.Struct(">I4xQQQQ")  # published, stray, last_stray, leftover, checks
OFF_BOOTS = 0x0C
OFF_PUBLISHED = 0x20
OFF_RECORDS = 0x100
_RECORD = struct.Struct(">QQQBB2xI")

#: Per kind: the config fields that are guest addresses (they move with the slot).
ADDRESS_FIELDS: dict[str, tuple[str, ...]] = {
    "virtio-ccw": ("summary_indicator", "device_indicator"),
    "zpci": ("aisb", "aibv"),
}


@dataclass(frozen=True)
class DriverSlots:
    """Where the guest may put its areas: ``slots`` slots of ``size`` bytes from ``base``."""

    base: int = FREE_GADDR
    size: int = 0x4000
    slots: int = 4

    def check(self, layout: Layout, memory_size: int) -> None:
        """Raise ValueError naming what does not fit."""
        if self.slots < 2:
            raise ValueError(f"slots {self.slots}: at least 2 (the previous boot's is checked)")
        if self.base < FREE_GADDR or self.base + self.slots * self.size > memory_size:
            raise ValueError(
                f"slots {self.base:#x}+{self.slots}x{self.size:#x} outside "
                f"{FREE_GADDR:#x}-{memory_size - 1:#x}"
            )
        for area in layout.areas:
            last = area.dsci_gaddr + (area.first_bit + area.n_vectors - 1) // 8
            for what, lo, hi in (
                ("summary", area.summary_gaddr, area.summary_gaddr),
                ("dsci", area.dsci_gaddr, last),
            ):
                # the guest touches whole aligned words: keep them in the slot
                if not (self.base <= lo - lo % 8 and (hi | 7) < self.base + self.size):
                    raise ValueError(
                        f"area {what} {lo:#x}-{hi:#x} outside slot 0 "
                        f"({self.base:#x}+{self.size:#x})"
                    )

    def keys_for_slots(self, keys: Mapping[int, int]) -> dict[int, int]:
        """``{page gaddr: key}`` for slot 0 repeated in every slot (the guest sets them
        all at every boot, so a keyed device keeps its key wherever a boot puts it)."""
        if keys and self.size % PAGE_SIZE:
            raise ValueError(f"slot size {self.size:#x}: keyed pages need a multiple of 4 KiB")
        return {page + i * self.size: key for page, key in keys.items() for i in range(self.slots)}

    def encode(self) -> bytes:
        """The driver block the host writes before the first boot."""
        return _HEAD.pack(MAGIC, self.slots, 0, self.base, self.size)


@dataclass(frozen=True)
class Registration:
    """One published record: a SET_IND_ADAPTER-shaped registration."""

    summary: int
    indicator: int
    ind_bit: int
    isc: int
    summary_mask: int
    counter_base: int


@dataclass(frozen=True)
class DriverStats:
    """The guest's driver-mode counters."""

    boots: int
    published: int
    stray: int
    last_stray: int
    leftover: int
    checks: int


def read_stats(memory: GuestMemory) -> DriverStats:
    """The driver block's counters, as the guest last stored them."""
    raw = memory.read(DRIVER_GADDR, 0x48)
    boots = struct.unpack_from(">I", raw, OFF_BOOTS)[0]
    published, stray, last, leftover, checks = _STATS.unpack_from(raw, OFF_PUBLISHED)
    return DriverStats(boots, published, stray, last, leftover, checks)


def read_registrations(memory: GuestMemory, count: int) -> list[Registration]:
    """The first ``count`` records (one per area, in parameter-block order)."""
    raw = memory.read(DRIVER_GADDR + OFF_RECORDS, count * _RECORD.size)
    return [Registration(*_RECORD.unpack_from(raw, i * _RECORD.size)) for i in range(count)]


def device_for(
    template: Mapping[str, Any], area: Area, record: Registration, name: str
) -> dict[str, Any]:
    """The ``device-add`` arguments for ``record``: ``template`` (the config entry the
    area came from) at the addresses the guest published, under ``name``."""
    fields = ADDRESS_FIELDS.get(str(template["kind"]))
    if fields is None:
        raise RigError(f"device kind {template['kind']!r} cannot move between boots")
    delta = record.summary - area.summary_gaddr
    if record.indicator - area.dsci_gaddr != delta:
        raise RigError(f"record {record} moved summary and indicator apart")
    device = {**template, "name": name}
    for field in fields:
        device[field] = int(template[field]) + delta
    return device


def areas_in_block_order(layout: Layout) -> Sequence[Area]:
    """The areas in the order the parameter block (and so the records) lists them."""
    return [area for group in layout.groups() for area in group]


async def wait_published(memory: GuestMemory, boot: int, timeout: float = 10.0) -> None:
    """Wait until the guest published the records of boot ``boot`` (or a later one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while read_stats(memory).published < boot:
        if loop.time() > deadline:
            raise RigError(f"boot {boot} not published within {timeout} s")
        await asyncio.sleep(0.002)


async def register_records(
    memory: GuestMemory,
    layout: GuestLayout,
    templates: Mapping[str, Mapping[str, Any]],
    client: QMPClient,
) -> dict[str, str]:
    """Play the VMM: read the published records and ``device-add`` each (lifetime
    ``guest``) as ``<template name>-b<boot>``; returns template name -> live name.

    ``templates`` are the config entries the layout was made from, by name.
    """
    boot = read_stats(memory).published
    areas = areas_in_block_order(layout.layout)
    by_area = {id(area): name for name, area in layout.areas.items()}
    records = read_registrations(memory, len(areas))
    names: dict[str, str] = {}
    for area, record in zip(areas, records, strict=True):
        template = by_area[id(area)]
        device = device_for(templates[template], area, record, f"{template}-b{boot}")
        await client.execute("device-add", {**device, "lifetime": "guest"})
        names[template] = device["name"]
    return names
