"""The rules a config keeps beyond each field's type.

:func:`indicators.config.parse_config` validates the fields with pydantic,
then calls :func:`check` on every section and device that is valid on its
own, so one run reports every problem: field errors and the rules between
fields, devices and the host together.  ``indicators config check`` and
``indicators run`` both load a config through that one function, so a
config that passes the check is not refused by ``run`` for anything the
file says.

The rules (each error names the device or section, the field and the value):

- device names are unique; indicator bits never overlap each other or a
  summary byte; indicator and summary bytes lie inside guest memory;
- devices sharing a summary bit share an ISC;
- one adapter id means one ISC, one kind and one suppressible flag
  (virtio-ccw adapters are ``0 << 3 | isc``, zPCI ``1 << 3 | isc``, a
  kvm-route gives its own id, so a route can collide with either);
- ``storage_keys``: each page a number, 4 KiB aligned, inside guest memory,
  each key byte 0..0xff without the reserved bit 0x01;
- ``ram = "auto"`` needs the ``[vmm]`` link that finds the file; an
  existing RAM file is at least ``memory_size`` bytes.

What depends on the host beyond the RAM file (KVM, fd sources, users,
sockets, addresses) is left to ``run``, which reports it with exit code 1.

Field errors themselves are rendered by :mod:`indicators.config_messages`.
Nothing here imports the models at run time (they are passed in), so the
models module can import this one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from .abi import PAGE_SHIFT, SKEY_RESERVED
from .config_messages import Problem, location_step
from .config_sections import DeviceConfig, EmulatedBackendConfig, KvmBackendConfig

__all__ = [
    "backend_problems",
    "check",
    "device_problems",
    "ram_file_problem",
    "storage_key_problems",
]

_PAGE = 1 << PAGE_SHIFT


# ------------------------------------------------------------------ rules


def check(
    backend: EmulatedBackendConfig | KvmBackendConfig | None,
    devices: Sequence[DeviceConfig],
    *,
    has_vmm: bool,
) -> list[Problem]:
    """Every rule on the parts given (``backend`` None: it had field errors)."""
    problems: list[Problem] = []
    if backend is not None:
        problems += backend_problems(backend, has_vmm=has_vmm)
        problems += _placement(backend.memory_size, devices)
    problems += _names(devices)
    problems += _overlaps(devices)
    problems += _summary_iscs(devices)
    problems += _adapter_identities(devices)
    return problems


def device_problems(memory_size: int, devices: Sequence[DeviceConfig]) -> list[Problem]:
    """The rules between devices and guest memory alone (the daemon's live set uses them)."""
    return _placement(memory_size, devices) + check(None, devices, has_vmm=False)


def backend_problems(
    backend: EmulatedBackendConfig | KvmBackendConfig, *, has_vmm: bool
) -> list[Problem]:
    """The rules of the backend section alone (the wiring repeats them before opening it)."""
    if backend.kind != "emulated":
        return []
    problems = storage_key_problems(backend.storage_keys, backend.memory_size)
    if backend.ram == "auto" and not has_vmm:
        problems.append(
            ("backend.ram", "'auto' asks the [vmm] link for the RAM file, but there is no [vmm]")
        )
    elif backend.ram is not None and backend.ram != "auto":
        problem = ram_file_problem(backend.ram, backend.memory_size)
        if problem is not None:
            problems.append(("backend.ram", problem))
    return problems


def storage_key_problems(keys: dict[str, int], memory_size: int) -> list[Problem]:
    """``storage_keys``: pages are numbers, aligned, in memory; keys are valid key bytes."""
    problems: list[Problem] = []
    for page, key in keys.items():
        where = f"backend.storage_keys.{location_step(page)}"
        try:
            gaddr = int(page, 0)
        except ValueError:
            problems.append((where, f"page {page!r} is not a number (write it like '0x10000')"))
            gaddr = None
        if gaddr is not None and not 0 <= gaddr < memory_size:
            problems.append(
                (where, f"page {gaddr:#x} is outside guest memory (memory_size {memory_size:#x})")
            )
        elif gaddr is not None and gaddr % _PAGE:
            problems.append(
                (
                    where,
                    f"page {gaddr:#x} is not 4 KiB aligned (its page starts at "
                    f"{gaddr & ~(_PAGE - 1):#x})",
                )
            )
        if not 0 <= key <= 0xFF:
            problems.append((where, f"key {key:#x} is not a key byte 0..0xff (ACC<<4|F|R|C)"))
        elif key & SKEY_RESERVED:
            problems.append(
                (
                    where,
                    f"key {key:#04x} sets the reserved bit {SKEY_RESERVED:#04x} "
                    f"(a key byte is ACC<<4 | F 0x08 | R 0x04 | C 0x02)",
                )
            )
    return problems


def ram_file_problem(path: str, memory_size: int) -> str | None:
    """Why an existing RAM file at ``path`` cannot back ``memory_size`` bytes (None: it can).

    A missing file is fine: the emulated backend creates it.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        return f"RAM file {path!r} cannot be inspected: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"RAM file {path!r} is not a regular file"
    if info.st_size < memory_size:
        return (
            f"RAM file {path!r} has {info.st_size:#x} bytes, fewer than "
            f"memory_size {memory_size:#x}"
        )
    return None


def _placement(memory_size: int, devices: Sequence[DeviceConfig]) -> list[Problem]:
    problems: list[Problem] = []
    limit = memory_size * 8
    for device in devices:
        where = f"device {device.name!r}"
        bits = device.dsci_bits()
        if bits.stop > limit:
            problems.append(
                (
                    f"{where}.{device.indicator_field}",
                    f"indicator bits end at byte {(bits.stop - 1) // 8:#x}, "
                    f"past guest memory ({memory_size:#x} bytes)",
                )
            )
        summary = device.summary_bit()
        if summary >= limit:
            problems.append(
                (
                    f"{where}.{device.summary_field}",
                    f"summary byte {summary // 8:#x} is past guest memory ({memory_size:#x} bytes)",
                )
            )
    return problems


def _names(devices: Sequence[DeviceConfig]) -> list[Problem]:
    seen: set[str] = set()
    problems: list[Problem] = []
    for device in devices:
        if device.name in seen:
            problems.append((f"device {device.name!r}.name", "duplicate device name"))
        seen.add(device.name)
    return problems


def _overlaps(devices: Sequence[DeviceConfig]) -> list[Problem]:
    problems: list[Problem] = []
    owner: dict[int, DeviceConfig] = {}  # absolute dsci bit -> device
    summary_bytes = {device.summary_bit() // 8 for device in devices}
    for device in devices:
        bits = device.dsci_bits()
        for bit in bits:
            first = owner.setdefault(bit, device)
            if first is not device:
                problems.append(
                    (
                        f"device {device.name!r}.{device.indicator_field}",
                        f"indicator bit {bit - bits.start} (byte {bit // 8:#x}, "
                        f"mask {0x80 >> (bit % 8):#04x}) overlaps device {first.name!r}",
                    )
                )
                break
    for bit, device in sorted(owner.items(), key=lambda item: item[0]):
        if bit // 8 in summary_bytes:
            problems.append(
                (
                    f"device {device.name!r}.{device.indicator_field}",
                    f"indicator bit at byte {bit // 8:#x} mask {0x80 >> (bit % 8):#04x} "
                    f"overlaps a summary indicator byte",
                )
            )
            break
    return problems


def _summary_iscs(devices: Sequence[DeviceConfig]) -> list[Problem]:
    problems: list[Problem] = []
    first: dict[int, DeviceConfig] = {}  # absolute summary bit -> first device
    for device in devices:
        other = first.setdefault(device.summary_bit(), device)
        if other.isc != device.isc:
            problems.append(
                (
                    f"device {device.name!r}.isc",
                    f"shares its summary bit with {other.name!r} "
                    f"(isc {other.isc}) but has isc {device.isc}",
                )
            )
    return problems


def _adapter_identities(devices: Sequence[DeviceConfig]) -> list[Problem]:
    """One adapter id, one isc, one kind, one suppressible flag; name both devices."""
    problems: list[Problem] = []
    first: dict[int, DeviceConfig] = {}  # adapter id -> first device on it
    for device in devices:
        adapter_id, kind, suppressible = device.adapter_identity()
        other = first.setdefault(adapter_id, device)
        if other is device:
            continue
        _, other_kind, other_suppressible = other.adapter_identity()
        where = f"device {device.name!r}"
        shared = f"adapter {adapter_id} of device {other.name!r} ({_identity_of(other)})"
        if kind != other_kind:
            field = "adapter_id" if device.kind == "kvm-route" else "isc"
            problems.append(
                (
                    f"{where}.{field}",
                    f"{_identity_of(device)} is also {shared}: one adapter id has one kind",
                )
            )
        elif other.isc != device.isc:
            problems.append(
                (
                    f"{where}.isc",
                    f"{_identity_of(device)} is also {shared}: one adapter id has one isc",
                )
            )
        elif suppressible != other_suppressible:
            problems.append(
                (
                    f"{where}.suppressible",
                    f"suppressible = {str(suppressible).lower()}, but {shared} has "
                    f"suppressible = {str(other_suppressible).lower()}: one adapter has one "
                    f"suppressible flag (put them on different ISCs)",
                )
            )
    return problems


def _identity_of(device: DeviceConfig) -> str:
    """How the device's adapter id comes about, in the config's words."""
    adapter_id, kind, _ = device.adapter_identity()
    if kind == "kvm-route":
        return f"kvm-route adapter_id {adapter_id}, isc {device.isc}"
    return f"{kind} adapter {adapter_id >> 3} << 3 | isc {device.isc} = {adapter_id}"
