"""Configuration: pydantic v2 models loaded from TOML.

A config names a memop backend, a retry policy and the devices, each
described the way the guest registered it with the VMM:

    [backend]
    kind = "emulated"
    memory_size = "64M"

    [[devices]]
    name = "net0"
    kind = "virtio-ccw"
    summary_indicator = 0x10000
    device_indicator = 0x10100
    ind_bit = 0
    vectors = 3
    isc = 3
    key = 3

Load with :func:`load_config` (raises :class:`ConfigError`, whose messages
name the device and the field) and turn into addresses with
:func:`indicators.adapters.build_model`.  ``indicators config schema`` prints
the JSON Schema of :class:`Config`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Config",
    "ConfigError",
    "ControlConfig",
    "DeviceConfig",
    "EmulatedBackendConfig",
    "FaultConfig",
    "KvmBackendConfig",
    "KvmRouteDevice",
    "RetryPolicy",
    "RunAsConfig",
    "VirtioCcwDevice",
    "VmmConfig",
    "ZpciDevice",
    "load_config",
    "parse_config",
]

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

Isc = Annotated[int, Field(ge=0, le=7, description="interruption subclass 0..7")]
AccessKey = Annotated[int, Field(ge=0, le=15, description="access key 0..15")]
Gaddr = Annotated[int, Field(ge=0, lt=1 << 64, description="guest absolute address")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_size(value: Any) -> Any:
    """Accept sizes as integers or strings like ``"256M"`` / ``"1GiB"``."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size (for example 268435456 or '256M')")
        return int(match.group(1)) * _UNITS[match.group(2).upper()]
    return value


# --------------------------------------------------------------------- backend


class FaultConfig(_Model):
    """Opt-in fault injection of the emulated backend, for tests and demonstrations."""

    eagain_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    eagain_sizes: tuple[Literal[1, 2, 4, 8, 16], ...] = (1, 2)
    protected: list[tuple[Gaddr, int]] = Field(
        default_factory=list, description="[gaddr, size] ranges where every store faults (4)"
    )
    seed: int | None = None


class EmulatedBackendConfig(_Model):
    """The emulation over mapped memory: anonymous, or a guest's RAM file."""

    kind: Literal["emulated"] = "emulated"
    memory_size: int = Field(gt=0, description="guest memory size in bytes, or '256M'")
    ram: str | None = Field(
        default=None,
        description="RAM file to map (QEMU memory-backend-file share=on), or 'auto' "
        "to ask the VMM link for it; none: anonymous memory",
    )
    storage_keys: dict[str, int] = Field(
        default_factory=dict,
        description="initial storage key byte per page, {'0x10000' = 0x30}",
    )
    faults: FaultConfig | None = None

    _size = field_validator("memory_size", mode="before")(parse_size)

    @field_validator("memory_size")
    @classmethod
    def _page_multiple(cls, value: int) -> int:
        if value % 4096:
            raise ValueError(f"memory_size {value:#x} is not a multiple of 4 KiB")
        return value


class KvmBackendConfig(_Model):
    """The real KVM_S390_MEM_OP ioctl on a VM fd."""

    kind: Literal["kvm"]
    memory_size: int = Field(gt=0, description="guest memory size (bounds the config check)")
    vm_fd: str = Field(
        description="where the VM fd comes from: 'fd:N' (inherited), 'unix:PATH' "
        "(SCM_RIGHTS), 'pid:N' (pidfd_getfd from the VMM), or 'libvirt' (pid:N of "
        "the [vmm] libvirt domain's QEMU)",
        pattern=r"^(fd:\d+|unix:.+|pid:\d+|libvirt)$",
    )
    abi: Literal["upstream", "v5", "auto"] = "auto"
    flic_fd: str | None = Field(
        default=None,
        description="FLIC device fd, same forms as vm_fd; enables AIRQ_INJECT and AISM",
    )

    _size = field_validator("memory_size", mode="before")(parse_size)


BackendConfig = Annotated[EmulatedBackendConfig | KvmBackendConfig, Field(discriminator="kind")]


class RetryPolicy(_Model):
    """Bounds of the cmpxchg retry loops."""

    max_no_xchg_rounds: int = Field(
        default=10_000, ge=1, description="compare-failed rounds before a notify fails"
    )
    eagain_backoff_base: float = Field(
        default=1e-5, gt=0, description="first -EAGAIN backoff in seconds"
    )
    eagain_backoff_cap: float = Field(default=1e-2, gt=0, description="longest backoff")
    eagain_attempts: int = Field(
        default=32, ge=1, description="-EAGAIN results tolerated per operation"
    )


# --------------------------------------------------------------------- devices


class _DeviceBase(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    key: AccessKey | None = Field(
        default=None, description="access key for the memops; none: no key checking"
    )

    # Geometry in absolute MSB-0 bit numbers: bit n of the guest is byte
    # n // 8, mask 0x80 >> (n % 8).  Subclasses say where their bits are.

    def dsci_bits(self) -> range:
        """The absolute bit numbers of the device's indicator bits, one per vector."""
        raise NotImplementedError

    def summary_bit(self) -> int:
        """The absolute bit number of the device's summary indicator."""
        raise NotImplementedError

    @property
    def vector_count(self) -> int:
        """How many vectors (queues, interrupts) the device has."""
        return len(self.dsci_bits())


class VirtioCcwDevice(_DeviceBase):
    """A virtio-ccw device with adapter interrupts (CCW SET_IND_ADAPTER)."""

    kind: Literal["virtio-ccw"]
    summary_indicator: Gaddr
    device_indicator: Gaddr
    ind_bit: int = Field(default=0, ge=0)
    vectors: int = Field(ge=1, le=4096, description="number of queues")
    isc: Isc = 3
    summary_test: Literal["byte", "bit"] = "byte"

    def dsci_bits(self) -> range:
        start = self.device_indicator * 8 + self.ind_bit
        return range(start, start + self.vectors)

    def summary_bit(self) -> int:
        return self.summary_indicator * 8 + 7  # QEMU ORs 0x01 into the summary byte


class ZpciDevice(_DeviceBase):
    """A zPCI function's MSI through the FIB (aibv/aisb)."""

    kind: Literal["zpci"]
    aibv: Gaddr
    aibvo: int = Field(default=0, ge=0)
    aisb: Gaddr
    aisbo: int = Field(default=0, ge=0)
    noi: int = Field(ge=1, le=2048, description="number of interrupts (vectors)")
    isc: Isc
    suppressible: bool = True
    summary_test: Literal["byte", "bit"] = "byte"

    def dsci_bits(self) -> range:
        start = self.aibv * 8 + self.aibvo
        return range(start, start + self.noi)

    def summary_bit(self) -> int:
        return self.aisb * 8 + self.aisbo


class KvmRouteDevice(_DeviceBase):
    """KVM's in-kernel adapter route (KVM_IRQ_ROUTING_S390_ADAPTER), one bit per vector."""

    kind: Literal["kvm-route"]
    ind_addr: Gaddr
    ind_offset: int = Field(default=0, ge=0)
    summary_addr: Gaddr
    summary_offset: int = Field(default=0, ge=0)
    adapter_id: int = Field(ge=0, lt=1 << 32)
    isc: Isc
    vectors: int = Field(default=1, ge=1, le=4096)
    suppressible: bool = False
    summary_test: Literal["byte", "bit"] = "bit"

    def dsci_bits(self) -> range:
        start = self.ind_addr * 8 + self.ind_offset
        return range(start, start + self.vectors)

    def summary_bit(self) -> int:
        return self.summary_addr * 8 + self.summary_offset


DeviceConfig = Annotated[VirtioCcwDevice | ZpciDevice | KvmRouteDevice, Field(discriminator="kind")]


# ------------------------------------------------------------- daemon sections


class ControlConfig(_Model):
    """The QMP-speaking control socket."""

    socket: str = Field(default="/run/indicators/indicators.sock")
    mode: int = Field(default=0o600, ge=0, le=0o777)
    allowed_uids: list[int] = Field(default_factory=list)
    allowed_gids: list[int] = Field(default_factory=list)
    max_message: int = Field(default=65536, ge=256)
    max_eventfds: int = Field(default=1024, ge=0)
    max_eventfds_per_client: int = Field(default=256, ge=0)
    max_pending: int = Field(default=8, ge=1, description="requests of one client in flight")
    max_rate: float | None = Field(
        default=None, gt=0, description="requests per second per client; none: unlimited"
    )


class VmmConfig(_Model):
    """The link to QEMU's QMP socket."""

    qmp_socket: str = Field(default="", description="QEMU's QMP socket; empty with libvirt")
    libvirt: str | None = Field(
        default=None,
        min_length=1,
        description="libvirt domain name: the QMP socket, QEMU's pid (vm_fd = 'libvirt') "
        "and the RAM file come from its running QEMU (indicators libvirt-snippet)",
    )
    hold_while_stopped: bool = True
    reconnect: bool = True
    reconnect_backoff_cap: float = Field(default=2.0, gt=0)
    disconnect_grace: float = Field(
        default=5.0,
        ge=0,
        description="seconds notifications are held while QEMU is unreachable before "
        "they fail with code UNAVAILABLE",
    )
    skeys_refresh: float | None = Field(
        default=None, gt=0, description="seconds between dump-skeys refreshes; none: never"
    )

    @model_validator(mode="after")
    def _socket_or_domain(self) -> VmmConfig:
        if not self.qmp_socket and self.libvirt is None:
            raise ValueError("give qmp_socket (QEMU's QMP socket) or libvirt (a domain name)")
        if self.libvirt is not None and "/" in self.libvirt:
            raise ValueError(f"libvirt domain name {self.libvirt!r} has a '/'")
        return self


class MetricsConfig(_Model):
    """The optional Prometheus endpoint."""

    address: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, lt=65536)


class RunAsConfig(_Model):
    """Drop to this user (and group) once the VM fd and the RAM file are open."""

    user: str = Field(min_length=1)
    group: str | None = None


class Config(_Model):
    """A whole ``indicators`` configuration."""

    backend: BackendConfig
    retry: RetryPolicy = RetryPolicy()
    devices: list[DeviceConfig] = Field(default_factory=list)
    control: ControlConfig | None = None
    vmm: VmmConfig | None = None
    metrics: MetricsConfig | None = None
    run_as: RunAsConfig | None = None


class ConfigError(ValueError):
    """A config that cannot be used; ``errors`` lists ``(where, what)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {where}: {what}" for where, what in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")


def _where(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    """Render a pydantic location, naming the device instead of its index."""
    parts: list[str] = []
    items = list(loc)
    if len(items) >= 2 and items[0] == "devices" and isinstance(items[1], int):
        index = items[1]
        devices = raw.get("devices")
        name = None
        if isinstance(devices, list) and index < len(devices) and isinstance(devices[index], dict):
            name = devices[index].get("name")
        parts.append(f"device {name!r}" if name else f"devices[{index}]")
        items = items[2:]
        if items and isinstance(items[0], str) and items[0] in ("virtio-ccw", "zpci", "kvm-route"):
            items = items[1:]
    parts.extend(_part(part) for part in items)
    return ".".join(parts) if parts else "(top level)"


def _part(part: int | str) -> str:
    """One location step: names as they are, odd keys (empty, dotted, spaced) quoted."""
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else repr(text)


def cross_check(config: Config) -> list[tuple[str, str]]:
    """The checks that need several fields or devices at once."""
    problems: list[tuple[str, str]] = []
    limit = config.backend.memory_size * 8
    seen_names: set[str] = set()
    owner: dict[int, str] = {}  # absolute dsci bit -> device name
    summaries: dict[int, DeviceConfig] = {}  # absolute summary bit -> first device
    summary_bytes: set[int] = set()
    for device in config.devices:
        where = f"device {device.name!r}"
        if device.name in seen_names:
            problems.append((f"{where}.name", "duplicate device name"))
        seen_names.add(device.name)
        bits = device.dsci_bits()
        field = _INDICATOR_FIELD[device.kind]
        if bits.stop > limit:
            problems.append(
                (
                    f"{where}.{field}",
                    f"indicator bits end at byte {(bits.stop - 1) // 8:#x}, "
                    f"past guest memory ({config.backend.memory_size:#x} bytes)",
                )
            )
        summary = device.summary_bit()
        if summary >= limit:
            problems.append(
                (
                    f"{where}.{_SUMMARY_FIELD[device.kind]}",
                    f"summary byte {summary // 8:#x} is past guest memory "
                    f"({config.backend.memory_size:#x} bytes)",
                )
            )
        other = summaries.setdefault(summary, device)
        if other.isc != device.isc:
            problems.append(
                (
                    f"{where}.isc",
                    f"shares its summary bit with {other.name!r} "
                    f"(isc {other.isc}) but has isc {device.isc}",
                )
            )
        summary_bytes.add(summary // 8)
        for bit in bits:
            first = owner.setdefault(bit, device.name)
            if first != device.name:
                problems.append(
                    (
                        f"{where}.{field}",
                        f"indicator bit {bit - bits.start} (byte {bit // 8:#x}, "
                        f"mask {0x80 >> (bit % 8):#04x}) overlaps device {first!r}",
                    )
                )
                break
    for bit, name in sorted(owner.items()):
        if bit // 8 in summary_bytes:
            problems.append(
                (
                    f"device {name!r}.{_INDICATOR_FIELD[_kind_of(config, name)]}",
                    f"indicator bit at byte {bit // 8:#x} mask {0x80 >> (bit % 8):#04x} "
                    f"overlaps a summary indicator byte",
                )
            )
            break
    return problems


_INDICATOR_FIELD = {"virtio-ccw": "device_indicator", "zpci": "aibv", "kvm-route": "ind_addr"}
_SUMMARY_FIELD = {"virtio-ccw": "summary_indicator", "zpci": "aisb", "kvm-route": "summary_addr"}


def _kind_of(config: Config, name: str) -> str:
    return next(d.kind for d in config.devices if d.name == name)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a decoded config; raise :class:`ConfigError` naming device and field."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors = [(_where(err["loc"], raw), err["msg"]) for err in exc.errors()]
        raise ConfigError(source, errors) from None
    problems = cross_check(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", exc.strerror or str(exc))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [("(toml)", str(exc))]) from None
    return parse_config(raw, str(path))
