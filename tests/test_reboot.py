"""The reboot torture (issue 15 items 4, 5), short: real QEMU guest, real daemon socket.

The long run is ``make soak`` (``python -m indicators.testing.reboot``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import pytest

from indicators.config import parse_config
from indicators.testing.build import skip_reason
from indicators.testing.driver import DriverSlots, Registration, device_for, read_registrations
from indicators.testing.errors import RigError
from indicators.testing.layout import GuestLayout, guest_layout
from indicators.testing.reboot import torture
from indicators.testing.rig import DEFAULT_DEVICES, IndicatorsRig, daemon_config

REBOOTS = 500


def _require_tools() -> None:
    reason = skip_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


async def test_reboot_torture_no_stray_byte_nothing_lost() -> None:
    _require_tools()
    report = await asyncio.wait_for(torture(REBOOTS), 120)
    assert report.reboots == REBOOTS, report.lines()
    assert report.checks == REBOOTS - 1, report.lines()
    assert report.notifications > 0 and report.set_bits > 0, report.lines()
    assert report.eventfd_reads > 0, report.lines()
    assert report.stray_bytes == 0, report.lines()
    assert report.lost == 0 and report.extra == 0, report.lines()
    assert report.oracle_lost == 0 and report.unsettled == 0, report.lines()
    assert not report.unexpected_failures, report.lines()
    assert report.ok


async def test_guest_registers_new_areas_every_boot_and_the_reset_drops_them() -> None:
    """Driver mode: each boot publishes records at new addresses, shaped like
    SET_IND_ADAPTER; the rig adds them with lifetime guest; a guest reboot (diag 308)
    under manage_reboot drops them before the next boot runs."""
    _require_tools()
    async with IndicatorsRig(
        driver=DriverSlots(slots=3), config={"vmm": {"manage_reboot": True}}
    ) as rig:
        admin = await rig.client("vmm")
        seen: list[dict[int, tuple[int, int]]] = []
        for boot in (1, 2, 3, 4):
            assert rig.driver_stats().published == boot
            names = await rig.register(admin)
            assert names == {name: f"{name}-b{boot}" for name in ("net0", "blk0", "pci0")}
            reply: Any = await admin.execute("query-adapters")
            live = {d["name"]: d for a in reply for d in a["devices"]}
            assert {live[n]["lifetime"] for n in names.values()} == {"guest"}
            records = read_registrations(rig.guest.memory, 3)
            by_counter = {r.counter_base: r for r in records}
            net0 = by_counter[rig.layout.areas["net0"].counter_base]
            assert (net0.isc, net0.ind_bit, net0.summary_mask) == (3, 0, 0x01)
            assert by_counter[rig.layout.areas["pci0"].counter_base].isc == 2
            seen.append({r.counter_base: (r.summary, r.indicator) for r in records})
            await admin.execute("notify", {"device": names["net0"], "vector": [1]})
            with admin.listener(names=("DEVICE_DELETED",)) as listener:
                assert await rig.reboot_guest() == boot + 1
                deleted = set()
                async for event in listener:
                    deleted.add((event["data"]["name"], event["data"]["reason"]))
                    if len(deleted) == 3:
                        break
            assert deleted == {(name, "guest-reset") for name in names.values()}
        # slots 1, 2, 0, 1: consecutive boots never share an address
        for before, after in itertools.pairwise(seen):
            assert not set(before.values()) & set(after.values())
        assert seen[0] == seen[3]
        assert rig.driver_stats().stray == 0


def test_driver_slots_refuse_what_the_guest_cannot_do() -> None:
    rig_layout = _template_layout()
    with pytest.raises(ValueError, match="at least 2"):
        DriverSlots(slots=1).check(rig_layout.layout, 64 << 20)
    with pytest.raises(ValueError, match="outside"):
        DriverSlots(base=0x30000, size=0x10, slots=2).check(rig_layout.layout, 64 << 20)
    with pytest.raises(ValueError, match="outside"):
        DriverSlots(base=0x20000).check(rig_layout.layout, 64 << 20)
    DriverSlots().check(rig_layout.layout, 64 << 20)
    assert DriverSlots(slots=3).encode()[:12] == b"AIRQDRV1\x00\x00\x00\x03"


def test_device_for_moves_every_address_field_by_the_published_offset() -> None:
    rig_layout = _template_layout()
    devices = {str(d["name"]): d for d in DEFAULT_DEVICES}
    for name, fields in (
        ("net0", ("summary_indicator", "device_indicator")),
        ("pci0", ("aisb", "aibv")),
    ):
        area = rig_layout.areas[name]
        record = Registration(area.summary_gaddr + 0x8000, area.dsci_gaddr + 0x8000, 0, 3, 1, 0)
        device = device_for(devices[name], area, record, f"{name}-b7")
        assert device["name"] == f"{name}-b7"
        for field in fields:
            assert device[field] == int(devices[name][field]) + 0x8000
        assert {k: v for k, v in device.items() if k not in (*fields, "name")} == {
            k: v for k, v in devices[name].items() if k not in (*fields, "name")
        }
    area = rig_layout.areas["net0"]
    torn = Registration(area.summary_gaddr + 0x8000, area.dsci_gaddr + 0x4000, 0, 3, 1, 0)
    with pytest.raises(RigError, match="apart"):
        device_for(devices["net0"], area, torn, "x")
    with pytest.raises(RigError, match="kvm-route"):
        device_for({"kind": "kvm-route"}, area, torn, "x")


def _template_layout() -> GuestLayout:
    config = parse_config(
        daemon_config(DEFAULT_DEVICES, memory_size=64 << 20, control_socket="c", vmm_socket="v"),
        "<test>",
    )
    return guest_layout(config.devices, {}, 64 << 20)


@pytest.mark.indicators_layout(driver=DriverSlots(), config={"vmm": {"manage_reboot": True}})
async def test_plugin_driver_mode_as_documented(indicators_rig: Any, indicators_qmp: Any) -> None:
    """The plugin's driver-mode example: register, notify, reboot, nothing stray."""
    names = await indicators_rig.register(indicators_qmp)
    await indicators_qmp.execute("notify", {"device": names["net0"], "vector": [1]})
    assert await indicators_rig.reboot_guest() == 2
    counts = await indicators_rig.park()
    assert counts == {("net0", 1): 1}  # consumed in boot 1 or found left over by boot 2
    assert indicators_rig.driver_stats().stray == 0


KEYED = [{**d, "key": 3} for d in DEFAULT_DEVICES]


@pytest.mark.indicators_layout(
    KEYED, driver=DriverSlots(slots=3), config={"vmm": {"manage_reboot": True}}
)
async def test_keyed_devices_keep_their_key_in_every_slot(
    indicators_rig: Any, indicators_qmp: Any
) -> None:
    """Each boot's pages carry the template's storage key, so a keyed device's
    notifications succeed wherever the boot put it (code 4 otherwise)."""
    keys = await indicators_rig.storage_keys()
    for slot in range(3):
        assert keys[0x31000 + slot * 0x4000].acc == 3
    for boot in (1, 2, 3, 4):
        names = await indicators_rig.register(indicators_qmp)
        await indicators_qmp.execute("notify", {"device": names["pci0"], "vector": [boot]})
        assert await indicators_rig.reboot_guest() == boot + 1
    counts = await indicators_rig.park()
    assert counts == {("pci0", v): 1 for v in (1, 2, 3, 4)}
