"""The airq guest: a bare-metal s390x program that clears adapter indicators.

``airq.S`` (next to this file, linked by ``airq.ld`` at 0x20000) is what
Linux's virtio-ccw airq handler does, in a polling loop, because under TCG
nothing outside QEMU can raise an adapter interrupt.  This module is its ABI:
the addresses, the parameter block layout and its encoding, the result and
report formats.  :mod:`indicators.testing.qemu` builds and runs it.

What the guest does
-------------------

At start it installs new PSWs (program check: a handler that writes a report
and stops; every other interruption: a disabled wait), checks the parameter
block (magic, version, counts, counter ranges, groups), applies the storage
keys listed in it with SSKE, sets ``state`` to RUNNING and loops.  Areas that
share one summary bit (several devices behind one summary, as Linux's
``airq_info`` has them) form a group.  One round: for every group whose
summary bit is set,

1. scan the DSCI bits of every area of the group and atomically clear each
   set one (CSG on the aligned doubleword, never NI: that is interlocked only
   with iacc2), adding 1 to the vector's counter for each bit its own CSG
   cleared;
2. clear only the group's summary bit (CS loop on the aligned word, so
   zPCI-style summaries that share a byte work);
3. scan every area of the group once more.

Clearing a shared summary after scanning only one of its areas would strand
a bit that another area's host set while the summary was already set.

then it adds 1 to ``rounds`` (the heartbeat) and looks at ``control``.  With
the host's order (DSCI bit, then summary) no set bit is ever stranded, and
each host set that found its bit clear is counted exactly once; a set that
found the bit already set merges into the earlier one.

Memory map (guest absolute addresses)
-------------------------------------

=================  ===================================================
0x0000-0x1fff      lowcore: new PSWs at 0x1a0-0x1ff, register save 0x200
0x2000-0x2fff      parameter block (:data:`PARAM_GADDR`)
0x3000-0x3fff      driver block (:mod:`indicators.testing.driver`, optional)
0x4000-0x1ffff     results: u64 counters (:data:`RESULTS_GADDR`)
0x20000-...        the program (ELF, under 4 KiB)
>= 0x30000         free for indicators (:data:`FREE_GADDR`)
=================  ===================================================

The 0x1000 page would do for the block too, but the lowcore's store-status
and machine-check save areas live at 0x1200-0x13ff.  QEMU loads only the
ELF's one segment, so the block (written into the RAM file before boot)
survives; a zeroed block would stop the guest with ERR_MAGIC.

Parameter block (big-endian; host writes before boot unless noted)
------------------------------------------------------------------

======  ====  ==================  =========================================
offset  size  field               meaning
======  ====  ==================  =========================================
0x000   8     magic               ``b"AIRQRIG1"``
0x008   4     version             2
0x00c   4     n_areas             at most 32
0x010   4     n_keys              at most 64
0x014   4     n_counters          counters in the results area
0x018   8     results_gaddr       0x4000
0x020   4     state               guest: :class:`GuestState`
0x024   4     error               guest: :class:`ParamError` << 16 | area
0x028   8     rounds              guest: scan rounds done (heartbeat)
0x030   8     control             host: seq << 32 | :class:`Command`
0x038   8     ack                 guest: the control value it acted on
0x040   8     summary_hits        guest: areas found with the summary set
0x048   8     cleared             guest: DSCI bits cleared (all counters)
0x050   8     rescan_cleared      guest: ... of them by the rescan (step 3)
0x058   8     scratch             guest-internal
0x060   4     pgm_marker          guest: non-zero after a program check
0x064   2     pgm_ilc             lowcore 0x8c: instruction length (bytes)
0x066   2     pgm_code            lowcore 0x8e: program interruption code
0x068   16    pgm_old_psw         lowcore 0x150: mask, address
0x078   8     pgm_teid            lowcore 0xa8: translation-exception id
0x080   128   pgm_gprs            r0-r15 at the program check
0x100   1024  areas[32]           32 bytes each, see below
0x500   1024  keys[64]            16 bytes each, see below
0xf00   24    (guest-internal)    register save of the group scan
======  ====  ==================  =========================================

Area entry: ``+0x00 u64 summary_gaddr``, ``+0x08 u64 dsci_gaddr``,
``+0x10 u32 first_bit`` (MSB-0: bit n is byte ``dsci + n // 8``, mask
``0x80 >> n % 8``), ``+0x14 u32 n_vectors``, ``+0x18 u32 counter_base``
(vector v counts in counter ``counter_base + v``), ``+0x1c u8
summary_mask``, ``+0x1d u8 group`` (areas from this one to the end of its
group: areas sharing a summary bit are consecutive, the first one's
``group`` counts them all; 1 for an area alone), ``+0x1e u8 isc`` (only
published, see :mod:`indicators.testing.driver`), 1 byte zero.

Key entry: ``+0x00 u64 page_gaddr``, ``+0x08 u8 key`` (ACC << 4 | F << 3 |
R << 2 | C << 1, as SSKE takes it), 7 bytes zero.

Handshake
---------

The guest acts on ``control`` between rounds, when it differs from ``ack``,
and then copies it to ``ack``: RUN continues, PARK spins without scanning
until ``control`` changes (all counter stores precede the ``ack`` store),
STOP loads the quiesce wait PSW (address 0xfff, QEMU shuts down), FAULT
executes opcode 0x0000 (operation exception, to exercise the report),
REBOOT re-IPLs with ``diag 308`` subcode 3 (driver mode checks its previous
slot first, see :mod:`indicators.testing.driver`).  A boot copies
``control`` to ``ack``: the command before a reboot is done.  The
sequence number makes every request a new value, so a stale ``ack`` can never
be mistaken for a fresh one.

Disabled-wait codes (the PSW address; QMP GUEST_PANICKED shows it):
0xdead01a0 restart, 0xdead01b0 external, 0xdead01c0 SVC, 0xdead01d0
program check, 0xdead01e0 machine check, 0xdead01f0 I/O, 0xdead0ba0 bad
parameter block, 0xfff STOP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

__all__ = [
    "FREE_GADDR",
    "LINKER_SCRIPT",
    "MAX_AREAS",
    "MAX_COUNTERS",
    "MAX_KEYS",
    "PARAM_GADDR",
    "RESULTS_GADDR",
    "SOURCE",
    "Area",
    "Command",
    "GuestState",
    "GuestStats",
    "KeySetting",
    "Layout",
    "ParamError",
    "ProgramCheck",
    "WaitCode",
]

SOURCE = Path(__file__).with_name("airq.S")
LINKER_SCRIPT = Path(__file__).with_name("airq.ld")

PARAM_GADDR = 0x2000
RESULTS_GADDR = 0x4000
PROGRAM_GADDR = 0x20000
FREE_GADDR = 0x30000
MAX_AREAS = 32
MAX_KEYS = 64
MAX_COUNTERS = (PROGRAM_GADDR - RESULTS_GADDR) // 8

MAGIC = b"AIRQRIG1"
VERSION = 2
PAGE_SIZE = 4096

# Field offsets in the parameter block (see the table above).
OFF_STATE = 0x020
OFF_ERROR = 0x024
OFF_ROUNDS = 0x028
OFF_CONTROL = 0x030
OFF_ACK = 0x038
OFF_SUMMARY_HITS = 0x040
OFF_CLEARED = 0x048
OFF_RESCAN_CLEARED = 0x050
OFF_PGM = 0x060
OFF_AREAS = 0x100
OFF_KEYS = 0x500
AREA_SIZE = 32
KEY_SIZE = 16

_HEADER = struct.Struct(">8sIIIIQ")
_AREA = struct.Struct(">QQIIIBBBx")
_KEY = struct.Struct(">QB7x")
_PGM = struct.Struct(">IHHQQQ16Q")


class GuestState(IntEnum):
    """The guest's ``state`` word."""

    NOT_STARTED = 0
    RUNNING = 1
    PARKED = 2
    STOPPED = 3
    BAD_PARAMS = 4
    PROGRAM_CHECK = 5


class Command(IntEnum):
    """The low word of ``control``."""

    RUN = 0
    PARK = 1
    STOP = 2
    FAULT = 3
    REBOOT = 4


class ParamError(IntEnum):
    """Why the guest rejected the parameter block (high half of ``error``)."""

    NONE = 0
    MAGIC = 1
    VERSION = 2
    N_AREAS = 3
    N_KEYS = 4
    COUNTERS = 5
    N_VECTORS = 6
    GROUP = 7


class WaitCode(IntEnum):
    """Addresses of the guest's disabled-wait PSWs."""

    STOP = 0xFFF
    RESTART = 0xDEAD01A0
    EXTERNAL = 0xDEAD01B0
    SVC = 0xDEAD01C0
    PROGRAM_CHECK = 0xDEAD01D0
    MACHINE_CHECK = 0xDEAD01E0
    IO = 0xDEAD01F0
    BAD_PARAMS = 0xDEAD0BA0


@dataclass(frozen=True)
class Area:
    """One adapter's indicators: a summary bit and a run of DSCI bits.

    Vector ``v`` (``0 <= v < n_vectors``) is DSCI bit ``first_bit + v``
    (MSB-0 from ``dsci_gaddr``) and counts in ``counter_base + v``.
    """

    summary_gaddr: int
    dsci_gaddr: int
    n_vectors: int
    counter_base: int
    first_bit: int = 0
    summary_mask: int = 0x01
    #: Published in the driver-mode registration record only (+0x1e u8).
    isc: int = 0

    def dsci_bit(self, vector: int) -> tuple[int, int]:
        """``(byte gaddr, mask)`` of ``vector``'s DSCI bit."""
        if not 0 <= vector < self.n_vectors:
            raise ValueError(f"vector {vector} outside 0..{self.n_vectors - 1}")
        bit = self.first_bit + vector
        return self.dsci_gaddr + bit // 8, 0x80 >> (bit % 8)

    def check(self, memory_size: int) -> None:
        """Raise ValueError naming the field the guest could not use."""
        if not 0 < self.summary_mask <= 0xFF:
            raise ValueError(f"summary mask {self.summary_mask:#x} is not a non-zero byte mask")
        if not 0 < self.n_vectors < 1 << 32 or not 0 <= self.first_bit < 1 << 32:
            raise ValueError(f"area bits {self.first_bit}+{self.n_vectors} out of range")
        last_dsci = self.dsci_gaddr + (self.first_bit + self.n_vectors - 1) // 8
        for what, lo, hi in (
            ("summary", self.summary_gaddr, self.summary_gaddr),
            ("dsci", self.dsci_gaddr, last_dsci),
        ):
            # The guest touches the whole aligned word or doubleword.
            if lo < FREE_GADDR or (hi | 7) >= memory_size:
                raise ValueError(
                    f"{what} {lo:#x}-{hi:#x} outside the free memory "
                    f"{FREE_GADDR:#x}-{memory_size - 1:#x}"
                )
        if not self.counter_base >= 0 or self.counter_base + self.n_vectors > MAX_COUNTERS:
            raise ValueError(f"counters {self.counter_base}+{self.n_vectors} exceed {MAX_COUNTERS}")


@dataclass(frozen=True)
class KeySetting:
    """A storage key the guest sets with SSKE before its first round."""

    page_gaddr: int
    key: int

    def check(self, memory_size: int) -> None:
        """Raise ValueError if the page or the key byte is unusable."""
        if not 0 <= self.page_gaddr < memory_size:
            raise ValueError(f"key page {self.page_gaddr:#x} outside memory")
        if not 0 <= self.key <= 0xFE or self.key & 1:
            raise ValueError(f"storage key {self.key:#x} is not ACC|F|R|C (bit 7 zero)")


@dataclass(frozen=True)
class Layout:
    """What the guest scans: areas, storage keys and the number of counters.

    Areas that share a summary bit (equal ``summary_gaddr`` and
    ``summary_mask``) are moved next to each other, in the order of their
    first appearance, because the guest scans them as one group; the area
    index in a :class:`ParamError` refers to that order.
    """

    areas: tuple[Area, ...]
    keys: tuple[KeySetting, ...] = ()

    def __post_init__(self) -> None:
        groups: dict[tuple[int, int], list[Area]] = {}
        for area in self.areas:
            groups.setdefault((area.summary_gaddr, area.summary_mask), []).append(area)
        object.__setattr__(self, "areas", tuple(a for group in groups.values() for a in group))

    def groups(self) -> list[tuple[Area, ...]]:
        """The areas grouped by summary bit, as the guest scans them."""
        groups: dict[tuple[int, int], list[Area]] = {}
        for area in self.areas:
            groups.setdefault((area.summary_gaddr, area.summary_mask), []).append(area)
        return [tuple(group) for group in groups.values()]

    @property
    def n_counters(self) -> int:
        """Counters in use: one past the highest area counter."""
        return max((a.counter_base + a.n_vectors for a in self.areas), default=0)

    def check(self, memory_size: int) -> None:
        """Raise ValueError for a layout the guest would reject or misuse."""
        if len(self.areas) > MAX_AREAS:
            raise ValueError(f"{len(self.areas)} areas, at most {MAX_AREAS}")
        if len(self.keys) > MAX_KEYS:
            raise ValueError(f"{len(self.keys)} storage keys, at most {MAX_KEYS}")
        masks: dict[int, set[int]] = {}
        for area in self.areas:
            area.check(memory_size)
            masks.setdefault(area.summary_gaddr, set()).add(area.summary_mask)
        for gaddr, in_byte in masks.items():
            union = 0
            for mask in in_byte:
                union |= mask
            if sum(m.bit_count() for m in in_byte) != union.bit_count():
                raise ValueError(
                    f"summary byte {gaddr:#x}: masks {sorted(in_byte)} overlap without being "
                    f"equal (areas share a summary bit only with the same mask)"
                )
        for key in self.keys:
            key.check(memory_size)

    def encode(self) -> bytes:
        """The parameter block page, as the host writes it before boot."""
        block = bytearray(PAGE_SIZE)
        _HEADER.pack_into(
            block,
            0,
            MAGIC,
            VERSION,
            len(self.areas),
            len(self.keys),
            self.n_counters,
            RESULTS_GADDR,
        )
        i = 0
        for group in self.groups():
            for left, a in zip(range(len(group), 0, -1), group, strict=True):
                _AREA.pack_into(
                    block,
                    OFF_AREAS + i * AREA_SIZE,
                    a.summary_gaddr,
                    a.dsci_gaddr,
                    a.first_bit,
                    a.n_vectors,
                    a.counter_base,
                    a.summary_mask,
                    left,
                    a.isc,
                )
                i += 1
        for i, k in enumerate(self.keys):
            _KEY.pack_into(block, OFF_KEYS + i * KEY_SIZE, k.page_gaddr, k.key)
        return bytes(block)


@dataclass(frozen=True)
class GuestStats:
    """The guest's own statistics (block fields of the same names)."""

    rounds: int
    summary_hits: int
    cleared: int
    rescan_cleared: int


@dataclass(frozen=True)
class ProgramCheck:
    """The guest's program-check report (``pgm_*`` fields of the block)."""

    ilc: int
    code: int
    psw_mask: int
    psw_addr: int
    teid: int
    gprs: tuple[int, ...]

    @classmethod
    def decode(cls, raw: bytes) -> ProgramCheck | None:
        """The report in ``raw`` (the block from :data:`OFF_PGM`), or None if none."""
        marker, ilc, code, mask, addr, teid, *gprs = _PGM.unpack_from(raw)
        if marker == 0:
            return None
        return cls(ilc & 0x6, code, mask, addr, teid, tuple(gprs))

    @property
    def instruction_gaddr(self) -> int:
        """The failing instruction, assuming the PSW points past it."""
        return self.psw_addr - self.ilc

    def __str__(self) -> str:
        return (
            f"program check code {self.code:#06x} ilc {self.ilc} at PSW "
            f"{self.psw_mask:016x} {self.psw_addr:016x} (teid {self.teid:#x})"
        )
