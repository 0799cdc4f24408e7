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

import os
import tomllib
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from . import config_messages, config_rules
from .config_sections import (
    ADAPTER_TYPES,
    BackendConfig,
    ConfigModel,
    DeviceConfig,
    EmulatedBackendConfig,
    FaultConfig,
    Gaddr,
    KvmBackendConfig,
    KvmRouteDevice,
    RetryPolicy,
    VirtioCcwDevice,
    ZpciDevice,
    parse_size,
)
from .errors import ConfigError

__all__ = [
    "ADAPTER_TYPES",
    "SUN_PATH_MAX",
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
    "parse_device",
    "parse_size",
]


# ------------------------------------------------------------- daemon sections

#: The longest unix socket path: ``sockaddr_un.sun_path`` less its terminating NUL.
SUN_PATH_MAX = 107


class ControlConfig(ConfigModel):
    """The QMP-speaking control socket."""

    @field_validator("socket")
    @classmethod
    def _fits_a_socket_address(cls, value: str) -> str:
        length = len(os.fsencode(value))
        if length > SUN_PATH_MAX:
            raise ValueError(
                f"{value!r} is {length} bytes; a unix socket path holds at most {SUN_PATH_MAX}"
            )
        return value

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ControlConfig:
        for start, end in self.device_ranges or ():
            if start >= end:
                raise ValueError(f"device_ranges: [{start:#x}, {end:#x}) is empty (start >= end)")
        return self

    socket: str = Field(default="/run/indicators/indicators.sock", min_length=1)
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


class VmmConfig(ConfigModel):
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


class MetricsConfig(ConfigModel):
    """The optional Prometheus endpoint."""

    address: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, lt=65536)


class RunAsConfig(ConfigModel):
    """Drop to this user (and group) once the VM fd and the RAM file are open."""

    user: str = Field(min_length=1)
    group: str | None = None


class Config(ConfigModel):
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


class _DeviceEntry(ConfigModel):
    """One ``[[devices]]`` entry on its own (``device-add``), located as in a config."""

    devices: list[DeviceConfig]


def parse_device(fields: Any) -> DeviceConfig:
    """Validate one ``[[devices]]`` entry; :class:`ConfigError` in the config check's words.

    The same model and wording as a device in a config file (the device's
    name and the field, the value given, "did you mean"); the rules between
    devices are the caller's (they depend on the set it joins).
    """
    raw = {"devices": [fields]}
    try:
        return _DeviceEntry.model_validate(raw).devices[0]
    except ValidationError as exc:
        problems = config_messages.field_errors(exc, raw, _DeviceEntry)
    # Not a config file's n-th entry: an unnamed device is just "device".
    raise ConfigError(
        "device", [(where.replace("devices[0]", "device", 1), what) for where, what in problems]
    )


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
