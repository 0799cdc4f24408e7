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
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from . import config_messages, config_rules
from .errors import ConfigError

__all__ = [
    "ADAPTER_TYPES",
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
    "parse_size",
]

_SIZE_PATTERN = r"^\s*(\d+)\s*([KMGTkmgt]?)(?:[iI]?[bB])?\s*$"
_SIZE = re.compile(_SIZE_PATTERN)
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


#: A size in bytes: an integer or a string like "16M"; the schema says both,
#: with the same pattern the loader applies.
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "exclusiveMinimum": 0},
                {"type": "string", "pattern": _SIZE_PATTERN},
            ]
        }
    ),
    Field(gt=0),
]


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

    # No default: the backend union is told apart by ``kind``, so it is always given.
    kind: Literal["emulated"]
    memory_size: Size = Field(description="guest memory size in bytes, or '256M'")
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
    kernel: Literal["6.3", "7.0"] = Field(
        default="6.3",
        description="kernel generation whose cmpxchg outcomes to reproduce: "
        "'6.3' (Linux 6.3-6.19) or '7.0' (7.0 and later)",
    )

    @field_validator("memory_size")
    @classmethod
    def _page_multiple(cls, value: int) -> int:
        if value % 4096:
            raise ValueError(f"memory_size {value:#x} is not a multiple of 4 KiB")
        return value


class KvmBackendConfig(_Model):
    """The real KVM_S390_MEM_OP ioctl on a VM fd."""

    kind: Literal["kvm"]
    memory_size: Size = Field(description="guest memory size (bounds the config check)")
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


#: QEMU's adapter types (hw/s390x/css.h: CSS_IO_ADAPTER_VIRTIO, _PCI); a
#: device of such a kind is on adapter ``type << 3 | isc``.
ADAPTER_TYPES = {"virtio-ccw": 0, "zpci": 1}


class _DeviceBase(_Model):
    #: The config fields that hold the device's indicator and summary addresses
    #: (errors about those addresses name them).
    indicator_field: ClassVar[str]
    summary_field: ClassVar[str]

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

    def adapter_identity(self) -> tuple[int, str, bool]:
        """``(adapter id, kind, suppressible)`` of the adapter this device is on.

        Devices with the same adapter id share one adapter; the config rules
        refuse devices that agree on the id but not on the rest.
        """
        raise NotImplementedError


class VirtioCcwDevice(_DeviceBase):
    """A virtio-ccw device with adapter interrupts (CCW SET_IND_ADAPTER)."""

    indicator_field = "device_indicator"
    summary_field = "summary_indicator"

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

    def adapter_identity(self) -> tuple[int, str, bool]:
        return ADAPTER_TYPES[self.kind] << 3 | self.isc, self.kind, False


class ZpciDevice(_DeviceBase):
    """A zPCI function's MSI through the FIB (aibv/aisb)."""

    indicator_field = "aibv"
    summary_field = "aisb"

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

    def adapter_identity(self) -> tuple[int, str, bool]:
        return ADAPTER_TYPES[self.kind] << 3 | self.isc, self.kind, self.suppressible


class KvmRouteDevice(_DeviceBase):
    """KVM's in-kernel adapter route (KVM_IRQ_ROUTING_S390_ADAPTER), one bit per vector."""

    indicator_field = "ind_addr"
    summary_field = "summary_addr"

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

    def adapter_identity(self) -> tuple[int, str, bool]:
        return self.adapter_id, self.kind, self.suppressible


DeviceConfig = Annotated[VirtioCcwDevice | ZpciDevice | KvmRouteDevice, Field(discriminator="kind")]


# ------------------------------------------------------------- daemon sections


class ControlConfig(_Model):
    """The QMP-speaking control socket."""

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ControlConfig:
        for start, end in self.device_ranges or ():
            if start >= end:
                raise ValueError(f"device_ranges: [{start:#x}, {end:#x}) is empty (start >= end)")
        return self

    socket: str = Field(default="/run/indicators/indicators.sock")
    mode: int = Field(default=0o600, ge=0, le=0o777)
    allowed_uids: list[int] = Field(default_factory=list)
    allowed_gids: list[int] = Field(default_factory=list)
    manager_uids: list[int] = Field(
        default_factory=list,
        description="uids that may manage (device-add, device-del, guest-reset); with "
        "manager_gids empty too: root and the daemon's own uid",
    )
    manager_gids: list[int] = Field(default_factory=list, description="gids that may manage")
    device_ranges: list[tuple[Gaddr, Gaddr]] | None = Field(
        default=None,
        description="[start, end) guest address ranges that devices added at run time must "
        "lie in (indicator and summary bytes); none: anywhere in guest memory",
    )
    max_message: int = Field(default=65536, ge=256)
    max_eventfds: int = Field(default=1024, ge=0)
    max_eventfds_per_client: int = Field(default=256, ge=0)
    max_pending: int = Field(default=8, ge=1, description="requests of one client in flight")
    max_rate: float | None = Field(
        default=None, gt=0, description="requests per second per client; none: unlimited"
    )
    max_clients: int = Field(default=128, ge=1, description="clients served at once")
    max_clients_per_uid: int = Field(default=64, ge=1, description="clients of one uid at once")
    max_fds_per_client: int = Field(default=16, ge=0, description="fds one client keeps (getfd)")
    negotiation_timeout: float | None = Field(
        default=30.0, gt=0, description="seconds a client has for qmp_capabilities; none: forever"
    )
    idle_timeout: float | None = Field(
        default=None, gt=0, description="seconds without input before a client is hung up on"
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
    manage_reboot: bool = Field(
        default=False,
        description="own the guest's reboot: QEMU pauses on a guest reboot (set-action), "
        "the daemon drops the guest's devices, then resets and continues the VM",
    )

    @model_validator(mode="after")
    def _socket_or_domain(self) -> VmmConfig:
        if not self.qmp_socket and self.libvirt is None:
            raise ValueError("give qmp_socket (QEMU's QMP socket) or libvirt (a domain name)")
        if self.libvirt is not None and "/" in self.libvirt:
            raise ValueError(f"libvirt domain name {self.libvirt!r} has a '/'")
        if self.libvirt is not None and self.manage_reboot:
            # libvirt would take the paused reboot for a guest shutdown (on_poweroff).
            raise ValueError(
                f"manage_reboot = true with libvirt = {self.libvirt!r}: libvirt owns the "
                f"guest's reboot handling; leave manage_reboot off (README: Guest reset)"
            )
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


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a decoded config; raise :class:`ConfigError` naming device and field.

    One pass: the field errors and the rules between fields and devices
    (:mod:`indicators.config_rules`) are reported together, the rules run
    on every section and device that is valid on its own.
    """
    try:
        config: Config | None = Config.model_validate(raw)
    except ValidationError as exc:
        config = None
        errors = config_messages.field_errors(exc, raw, Config)
    else:
        errors = []
    if config is not None:
        parts = _Parts(config.backend, config.devices, config.vmm is not None)
    else:
        parts = _valid_parts(raw)
    errors += config_rules.check(parts.backend, parts.devices, has_vmm=parts.has_vmm)
    if errors:
        raise ConfigError(source, errors)
    assert config is not None  # no errors: the whole model validated
    return config


class _Parts(NamedTuple):
    """What the rules look at; from a config with field errors, the parts valid alone."""

    backend: EmulatedBackendConfig | KvmBackendConfig | None
    devices: list[DeviceConfig]
    has_vmm: bool


_BACKEND: TypeAdapter[EmulatedBackendConfig | KvmBackendConfig] = TypeAdapter(BackendConfig)
_DEVICE: TypeAdapter[VirtioCcwDevice | ZpciDevice | KvmRouteDevice] = TypeAdapter(DeviceConfig)
_T = TypeVar("_T")


def _valid_parts(raw: Any) -> _Parts:
    """The sections and devices of ``raw`` that are valid each on its own."""
    if not isinstance(raw, dict):
        return _Parts(None, [], False)
    backend = _valid(_BACKEND, raw.get("backend"))
    listed = raw.get("devices")
    devices = [_valid(_DEVICE, item) for item in (listed if isinstance(listed, list) else [])]
    return _Parts(backend, [d for d in devices if d is not None], "vmm" in raw)


def _valid(adapter: TypeAdapter[_T], value: Any) -> _T | None:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", exc.strerror or str(exc))]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("(toml)", str(exc))]) from None
    return parse_config(raw, str(path))
