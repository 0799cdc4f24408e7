"""The config's backend and device sections: what the config rules read.

The models of ``[backend]`` (the emulation or KVM), ``[retry]`` and
``[[devices]]`` (one class per device kind, told apart by ``kind``), the
size type ("16M" or an integer) and the base of every config section.
:mod:`indicators.config` puts them together with the daemon's sections into
a whole :class:`~indicators.config.Config`; :mod:`indicators.config_rules`
checks them against each other.  Import them from :mod:`indicators.config`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    field_validator,
)

__all__ = [
    "ADAPTER_TYPES",
    "BackendConfig",
    "ConfigModel",
    "DeviceConfig",
    "EmulatedBackendConfig",
    "FaultConfig",
    "Gaddr",
    "KvmBackendConfig",
    "KvmRouteDevice",
    "RetryPolicy",
    "VirtioCcwDevice",
    "ZpciDevice",
    "parse_size",
]

_SIZE_PATTERN = r"^\s*(\d+)\s*([KMGTkmgt]?)(?:[iI]?[bB])?\s*$"
_SIZE = re.compile(_SIZE_PATTERN)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

Isc = Annotated[int, Field(ge=0, le=7, description="interruption subclass 0..7")]
AccessKey = Annotated[int, Field(ge=0, le=15, description="access key 0..15")]
Gaddr = Annotated[int, Field(ge=0, lt=1 << 64, description="guest absolute address")]


class ConfigModel(BaseModel):
    """A config section: unknown fields refused, frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_size(value: Any) -> Any:
    """Accept sizes as integers or strings like ``"256M"`` / ``"1GiB"``."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size (for example 268435456 or '256M')")
        return int(match.group(1)) * _UNITS[match.group(2).upper()]
    return value


#: Guest absolute addresses are 64-bit: no guest memory is larger.
MAX_MEMORY = 1 << 64


def _within_address_space(value: int) -> int:
    if value > MAX_MEMORY:
        raise ValueError(
            f"{value:#x} bytes is past the 64-bit guest address space (at most {MAX_MEMORY:#x})"
        )
    return value


#: A size in bytes: an integer or a string like "16M" (not a boolean, not a
#: float), at most the 64-bit address space; the schema says both forms,
#: with the same pattern the loader applies.
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_MEMORY},
                {"type": "string", "pattern": _SIZE_PATTERN},
            ]
        }
    ),
    Strict(),
    Field(gt=0),
    AfterValidator(_within_address_space),
]


# --------------------------------------------------------------------- backend


class FaultConfig(ConfigModel):
    """Opt-in fault injection of the emulated backend, for tests and demonstrations."""

    eagain_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    eagain_sizes: tuple[Literal[1, 2, 4, 8, 16], ...] = (1, 2)
    protected: list[tuple[Gaddr, int]] = Field(
        default_factory=list, description="[gaddr, size] ranges where every store faults (4)"
    )
    seed: int | None = None


class EmulatedBackendConfig(ConfigModel):
    """The emulation over mapped memory: anonymous, or a guest's RAM file."""

    # No default: the backend union is told apart by ``kind``, so it is always given.
    kind: Literal["emulated"]
    memory_size: Size = Field(description="guest memory size in bytes, or '256M'")
    ram: str | None = Field(
        default=None,
        min_length=1,
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


class KvmBackendConfig(ConfigModel):
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


class RetryPolicy(ConfigModel):
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


class _DeviceBase(ConfigModel):
    # Strict: a device's numbers are integers, its flags booleans (no "8" for 8, no
    # true for 1), in a config file and in device-add alike.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

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
