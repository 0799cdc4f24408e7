"""From an ``indicators`` device config to what the airq guest scans.

The rig describes the adapters once, the way a config file does (device
dicts of kinds ``virtio-ccw``, ``zpci``, ``kvm-route``); :func:`guest_layout`
turns the validated devices into the guest's :class:`~indicators.testing.guest.Layout`:

- one guest area per device: its DSCI bits (any start bit, MSB-0) and its
  summary bit (virtio-ccw: mask 0x01 of ``summary_indicator``; zPCI and KVM
  routes: bit ``aisbo`` / ``summary_offset``);
- devices behind the same summary bit form one group, scanned together
  before the summary is cleared (as Linux's ``airq_info`` does);
- one counter per (device, vector), in config order;
- the storage keys the guest sets with SSKE.

    layout = guest_layout(config.devices, {0x31000: 0x30})
    layout.counter[("net0", 2)]      # index of net0 vector 2's counter

:func:`derived_storage_keys` gives every page holding a keyed device's
bits that device's key (ACC), the default when a test names none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from indicators.config import DeviceConfig
from indicators.testing.guest import FREE_GADDR, PAGE_SIZE, Area, KeySetting, Layout

__all__ = ["GuestLayout", "derived_storage_keys", "guest_layout"]


@dataclass(frozen=True)
class GuestLayout:
    """The guest's layout plus where each (device, vector) is counted."""

    layout: Layout
    #: device name -> its guest area
    areas: dict[str, Area]
    #: (device, vector) -> index in the guest's results
    counter: dict[tuple[str, int], int]

    def by_target(self, counts: Sequence[int]) -> dict[tuple[str, int], int]:
        """The guest's raw ``counts`` keyed by (device, vector), zeros left out."""
        return {target: counts[i] for target, i in self.counter.items() if counts[i]}


def _area(device: DeviceConfig, counter_base: int, memory_size: int) -> Area:
    bits = device.dsci_bits()
    summary = device.summary_bit()
    area = Area(
        summary_gaddr=summary // 8,
        summary_mask=0x80 >> (summary % 8),
        dsci_gaddr=bits.start // 8,
        first_bit=bits.start % 8,
        n_vectors=len(bits),
        counter_base=counter_base,
        isc=int(getattr(device, "isc", 0)),
    )
    try:
        area.check(memory_size)
    except ValueError as exc:
        raise ValueError(
            f"device {device.name!r}: {exc} (the rig's guest uses the memory below "
            f"{FREE_GADDR:#x} itself)"
        ) from None
    return area


def guest_layout(
    devices: Sequence[DeviceConfig], storage_keys: Mapping[int, int], memory_size: int
) -> GuestLayout:
    """The guest layout for validated ``devices``; ValueError names what the guest cannot do.

    ``storage_keys`` maps a gaddr in each page to the key byte the guest sets
    (``ACC << 4 | F << 3``; R and C follow the guest's accesses).
    """
    areas: dict[str, Area] = {}
    counter: dict[tuple[str, int], int] = {}
    base = 0
    for device in devices:
        areas[device.name] = _area(device, base, memory_size)
        for vector in range(device.vector_count):
            counter[(device.name, vector)] = base + vector
        base += device.vector_count
    keys = tuple(
        KeySetting(page - page % PAGE_SIZE, key) for page, key in sorted(storage_keys.items())
    )
    layout = Layout(areas=tuple(areas.values()), keys=keys)
    layout.check(memory_size)
    return GuestLayout(layout, areas, counter)


def derived_storage_keys(devices: Sequence[DeviceConfig]) -> dict[int, int]:
    """Every page with a keyed device's DSCI or summary bits gets ACC = that key.

    ValueError when two devices with different keys share a page.
    """
    keys: dict[int, tuple[int, str]] = {}
    for device in devices:
        if not device.key:
            continue
        bits = device.dsci_bits()
        pages = set(range(bits.start // 8 // PAGE_SIZE, (bits.stop - 1) // 8 // PAGE_SIZE + 1))
        pages.add(device.summary_bit() // 8 // PAGE_SIZE)
        for page in sorted(pages):
            key, owner = keys.setdefault(page, (device.key, device.name))
            if key != device.key:
                raise ValueError(
                    f"page {page * PAGE_SIZE:#x} holds bits of {owner!r} (key {key}) and of "
                    f"{device.name!r} (key {device.key}); give storage keys explicitly"
                )
    return {page * PAGE_SIZE: key << 4 for page, (key, _) in keys.items()}
