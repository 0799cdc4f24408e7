"""What a config reload changed, one line per device, for the log.

    for line in device_changes(old_model, new_model):
        log.info("reload: %s", line)

A device is added, removed, or moved (its dsci bits, summary bit, key or
isc differ); each line names the device and its old and new places, so an
operator can tell from the log alone which addresses a reload changed.
"""

from __future__ import annotations

from ..adapters import AdapterModel, Device

__all__ = ["device_changes"]


def _placement(device: Device) -> str:
    """Where a device's bits are: dsci first..last bit address, summary, key, isc."""
    first, last = device.dsci[0], device.dsci[-1]
    return (
        f"dsci {first.gaddr:#x}/{first.mask:#04x}..{last.gaddr:#x}/{last.mask:#04x} "
        f"({device.vectors} vectors), summary {device.summary.gaddr:#x}/"
        f"{device.summary.mask:#04x}, key {device.key}, isc {device.adapter.isc}"
    )


def device_changes(old: AdapterModel, new: AdapterModel) -> list[str]:
    """One line per device a reload added, removed or moved (old and new places)."""
    lines = []
    for name in sorted(old.devices.keys() | new.devices.keys()):
        before, after = old.devices.get(name), new.devices.get(name)
        if before is None and after is not None:
            lines.append(f"device {name!r} added at {_placement(after)}")
        elif after is None and before is not None:
            lines.append(f"device {name!r} removed from {_placement(before)}")
        elif before is not None and after is not None:
            was, now = _placement(before), _placement(after)
            if was != now:
                lines.append(f"device {name!r} moved from {was} to {now}")
    return lines
