"""The adapter model: devices and adapters resolved to guest addresses.

:func:`build_model` turns a validated :class:`~indicators.config.Config` into
an :class:`AdapterModel`: each :class:`Device` knows, per vector, the byte
and mask of its dsci bit, and where its summary bit is; devices are grouped
into :class:`Adapter` objects the way QEMU groups them (a type and an ISC,
adapter id ``type << 3 | isc``; KVM routes carry their own adapter id).

Addresses here are final: the engine only looks them up.  The model is
live: :meth:`AdapterModel.add` and :meth:`AdapterModel.remove` change the
device set at run time (the daemon's device registry calls them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from .config import ADAPTER_TYPES, Config, DeviceConfig

__all__ = ["ADAPTER_TYPES", "Adapter", "AdapterModel", "Bit", "Device", "build_model"]


class Bit(NamedTuple):
    """One indicator bit: the byte that holds it and the MSB-0 mask in that byte."""

    gaddr: int
    mask: int

    @classmethod
    def at(cls, absolute: int) -> Bit:
        """The bit with absolute MSB-0 number ``absolute`` (byte ``absolute // 8``)."""
        return cls(absolute >> 3, 0x80 >> (absolute & 7))


@dataclass(eq=False)
class Adapter:
    """An I/O adapter: what an adapter interrupt is raised for."""

    id: int
    isc: int
    kind: str
    suppressible: bool
    devices: list[Device] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A stable label, e.g. ``virtio-ccw/3``."""
        return f"{self.kind}/{self.id}"


@dataclass(eq=False)
class Device:
    """A device whose vectors set dsci bits behind one summary bit."""

    name: str
    kind: str
    adapter: Adapter
    key: int | None
    dsci: list[Bit]
    summary: Bit
    summary_test: Literal["byte", "bit"]
    config: DeviceConfig

    @property
    def vectors(self) -> int:
        """Number of vectors."""
        return len(self.dsci)


@dataclass
class AdapterModel:
    """All devices and adapters of one guest."""

    devices: dict[str, Device]
    adapters: dict[int, Adapter]

    def device(self, name: str) -> Device:
        """The device called ``name``; KeyError names the unknown device."""
        try:
            return self.devices[name]
        except KeyError:
            raise KeyError(f"unknown device {name!r}") from None

    def add(self, spec: DeviceConfig) -> Device:
        """Resolve ``spec`` and add it (on its adapter, made if new); the caller validated it."""
        adapter_id, kind, suppressible = spec.adapter_identity()
        adapter = self.adapters.get(adapter_id)
        if adapter is None:
            adapter = self.adapters[adapter_id] = Adapter(adapter_id, spec.isc, kind, suppressible)
        device = Device(
            name=spec.name,
            kind=spec.kind,
            adapter=adapter,
            key=spec.key,
            dsci=[Bit.at(bit) for bit in spec.dsci_bits()],
            summary=Bit.at(spec.summary_bit()),
            summary_test=spec.summary_test,
            config=spec,
        )
        adapter.devices.append(device)
        self.devices[spec.name] = device
        return device

    def remove(self, name: str) -> Device:
        """Take device ``name`` out (and its adapter when it was the last on it)."""
        device = self.device(name)
        del self.devices[name]
        adapter = device.adapter
        adapter.devices.remove(device)
        if not adapter.devices:
            del self.adapters[adapter.id]
        return device

    def allowed_bits(self) -> dict[int, int]:
        """``{gaddr: mask}`` of every configured dsci and summary bit."""
        allowed: dict[int, int] = {}
        for device in self.devices.values():
            for bit in (*device.dsci, device.summary):
                allowed[bit.gaddr] = allowed.get(bit.gaddr, 0) | bit.mask
        return allowed

    def owned_bytes(self) -> set[int]:
        """Every guest byte that holds a configured dsci or summary bit."""
        return set(self.allowed_bits())


def build_model(config: Config) -> AdapterModel:
    """Resolve a validated config (see :func:`indicators.config.parse_config`)."""
    model = AdapterModel({}, {})
    for spec in config.devices:
        model.add(spec)
    return model
