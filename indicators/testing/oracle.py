"""The caller-side delivery oracle: was every acknowledged notification delivered?

The daemon's promise is that an acknowledged notification is in guest
memory.  A test cannot take the engine's word for it (``engine.set_counts``
is produced by the code under test), so :class:`DeliveryOracle` judges from
the two sides the engine does not control:

- the *caller*, who knows what it submitted and what was acknowledged or
  refused, and
- the *guest*, who reads the bits in its memory and counts, per
  ``(device, vector)``, the set bits it consumed (the simulated guest's
  ``counts``, the real test guest's per-vector counters).

For every acknowledged item, either its bit was set in guest memory when the
acknowledgement arrived, or the guest's counter for that ``(device, vector)``
moved after the item was submitted (the guest may consume and clear the bit
between the write and the acknowledgement).  An item with neither evidence
is *lost*.

The bit is sampled at acknowledgement.  A guest clears a bit before it
counts it, so at acknowledgement the counter may not have moved yet; how
long to wait for it is the question:

- without ``settle``, the counter is compared in :meth:`DeliveryOracle.verdict`,
  once the guest has consumed everything.  That is always right, but weak
  under load: any later delivery of the same vector moves the counter too,
  so an acknowledgement that wrote nothing is only caught when its vector
  is not notified again;
- with ``settle`` (a callable that returns once the guest has counted
  every bit it cleared before the call, e.g. after two of its polling
  rounds), an acknowledgement that finds the bit clear and the counter
  unmoved calls it and reads the counter again: that value is final for
  the item.  A guest that does not run concurrently with the caller (it is
  polled by the test between requests) settles with ``lambda: None``.

Use::

    oracle = DeliveryOracle(read_bit=..., guest_count=...)
    token = oracle.submit("net0", 2)
    ...                       # send it
    oracle.acknowledged(token)   # right when the acknowledgement arrives
    # or oracle.failed(token, "EAGAIN")
    ...                       # let the guest consume what is left
    verdict = oracle.verdict()
    assert verdict.ok, verdict

Over the simulated guest (:class:`~indicators.simguest.SimulatedGuest`) in
its thread, with the bits worked out by the test::

    oracle = oracle_for(memory.load, bit_of, guest.counts,
                        settle=rounds_settle(lambda: guest.rounds))
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "DeliveryOracle",
    "GuestGone",
    "Item",
    "OracleError",
    "Verdict",
    "oracle_for",
    "rounds_settle",
]

#: ``read_bit(device, vector)``: is the item's dsci bit set in guest memory now?
ReadBit = Callable[[str, int], bool]
#: ``guest_count(device, vector)``: how many times the guest consumed that bit.
GuestCount = Callable[[str, int], int]


class GuestGone(Exception):
    """Raised by ``read_bit``/``guest_count`` when the guest no longer exists (killed):
    an item acknowledged then cannot be judged and is counted as unverifiable."""


class OracleError(Exception):
    """The oracle was used wrongly (a token settled twice, or a foreign token)."""

    def __init__(self, token: int, problem: str) -> None:
        self.token = token
        self.problem = problem
        super().__init__(f"oracle token {token}: {problem}")


@dataclass(frozen=True)
class Item:
    """One submitted notification: ``(device, vector)`` and the guest's count at submission."""

    token: int
    device: str
    vector: int
    count_at_submit: int


# Outcomes, one byte per item (a million items must stay cheap to record).
_PENDING, _FAILED, _ACKED_BIT, _ACKED_NO_BIT, _ACKED_GONE = 0, 1, 2, 3, 4
_OUTCOME_NAMES = {
    _FAILED: "failed",
    _ACKED_BIT: "acknowledged",
    _ACKED_NO_BIT: "acknowledged",
    _ACKED_GONE: "acknowledged",
}


@dataclass
class Verdict:
    """What happened to every submitted item, judged from the caller and the guest."""

    submitted: int = 0
    acknowledged: int = 0
    #: acknowledged items whose bit was seen in memory at acknowledgement
    seen_in_memory: int = 0
    #: acknowledged items shown delivered only by the guest's counter
    seen_by_counter: int = 0
    #: of those, items whose counter had not moved yet at acknowledgement, without
    #: ``settle`` (the guest counted late, or a later delivery of the same vector
    #: is all the evidence there is: many of these point at lost notifications)
    counted_late: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    #: submitted items neither acknowledged nor failed
    unsettled: list[Item] = field(default_factory=list)
    #: acknowledged items with no evidence of delivery
    lost: list[Item] = field(default_factory=list)
    #: acknowledged after the guest was gone (killed): nothing left to look at
    unverifiable: int = 0

    @property
    def ok(self) -> bool:
        """Nothing lost and nothing left unsettled."""
        return not self.lost and not self.unsettled

    def unexpected_failures(self, allowed: Iterable[str] = ()) -> Counter[str]:
        """Failures whose code is not in ``allowed``."""
        allow = set(allowed)
        return Counter({code: n for code, n in self.failed.items() if code not in allow})

    def lines(self) -> list[str]:
        """A readable account, one fact per line."""
        failed = ", ".join(f"{code}: {n}" for code, n in sorted(self.failed.items())) or "none"
        out = [
            f"submitted {self.submitted}, acknowledged {self.acknowledged} "
            f"(bit seen at acknowledgement {self.seen_in_memory}, "
            f"guest counter moved {self.seen_by_counter}, of which after acknowledgement "
            f"{self.counted_late})",
            f"failed by code: {failed}",
            f"lost (acknowledged, never reached the guest): {len(self.lost)}",
        ]
        if self.unverifiable:
            out.append(f"acknowledged after the guest was gone (unverifiable): {self.unverifiable}")
        out += [f"  lost {i.device} vector {i.vector} (token {i.token})" for i in self.lost[:20]]
        if len(self.lost) > 20:
            out.append(f"  ... and {len(self.lost) - 20} more")
        if self.unsettled:
            out.append(f"unsettled (neither acknowledged nor failed): {len(self.unsettled)}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


class DeliveryOracle:
    """Records submissions and outcomes and judges delivery; see the module docstring.

    Thread-safe: callers may settle tokens from several threads (the guest
    callables are the caller's business).
    """

    def __init__(
        self,
        read_bit: ReadBit,
        guest_count: GuestCount,
        *,
        settle: Callable[[], None] | None = None,
    ) -> None:
        self._read_bit = read_bit
        self._guest_count = guest_count
        self._settle = settle
        # Per token, in parallel arrays (no object per item: a soak records
        # millions, and freed arrays go back to the system, unlike small objects):
        # the target's index, the guest's count at submission and at
        # acknowledgement, the outcome, the failure code's index.
        self._target_index: dict[tuple[str, int], int] = {}
        self._target_list: list[tuple[str, int]] = []
        self._targets = array("l")
        self._at_submit = array("q")
        self._at_ack = array("q")
        self._outcome = bytearray()
        self._code_index: dict[str, int] = {}
        self._code_list: list[str] = []
        self._codes = array("l")
        self._lock = threading.Lock()
        #: Items acknowledged so far (for progress reports; the verdict judges them).
        self.acknowledged_count = 0

    def submit(self, device: str, vector: int) -> int:
        """Record an item about to be sent; returns its token."""
        try:
            count = self._guest_count(device, vector)
        except GuestGone:
            count = 1 << 62  # nothing can move it: unless refused, it is unverifiable
        with self._lock:
            index = self._target_index.get((device, vector))
            if index is None:
                index = self._target_index[(device, vector)] = len(self._target_list)
                self._target_list.append((device, vector))
            token = len(self._targets)
            self._targets.append(index)
            self._at_submit.append(count)
            self._at_ack.append(0)
            self._outcome.append(_PENDING)
            self._codes.append(-1)
        return token

    def submit_many(self, items: Iterable[tuple[str, int]]) -> list[int]:
        """:meth:`submit` for each ``(device, vector)``, in order."""
        return [self.submit(device, vector) for device, vector in items]

    def _settling(self, token: int, outcome: int) -> None:
        """Mark ``token`` settled as ``outcome``; it must be pending (caller holds the lock)."""
        if not 0 <= token < len(self._targets):
            raise OracleError(token, "not issued by this oracle")
        current = self._outcome[token]
        if current != _PENDING:
            raise OracleError(token, f"already {_OUTCOME_NAMES[current]}")
        self._outcome[token] = outcome

    def acknowledged(self, token: int) -> None:
        """The item was acknowledged: sample its bit now."""
        with self._lock:
            self._settling(token, _ACKED_BIT)
            self.acknowledged_count += 1
        device, vector = self._target_list[self._targets[token]]
        try:
            if self._read_bit(device, vector):
                return
            self._outcome[token] = _ACKED_NO_BIT
            count = self._guest_count(device, vector)
            if count <= self._at_submit[token] and self._settle is not None:
                self._settle()  # a bit cleared but not yet counted gets counted
                count = self._guest_count(device, vector)
        except GuestGone:
            self._outcome[token] = _ACKED_GONE
            return
        self._at_ack[token] = count

    def failed(self, token: int, code: str) -> None:
        """The item was refused or failed with ``code`` (an errno name, PIC, ...)."""
        with self._lock:
            self._settling(token, _FAILED)
            index = self._code_index.get(str(code))
            if index is None:
                index = self._code_index[str(code)] = len(self._code_list)
                self._code_list.append(str(code))
            self._codes[token] = index

    def verdict(self) -> Verdict:
        """Judge every item; call once the guest has consumed all it will."""
        with self._lock:
            outcome = bytes(self._outcome)
        verdict = Verdict(submitted=len(outcome))
        final: dict[tuple[str, int], int] = {}
        at_submit, at_ack, target_of, indices = (
            self._at_submit, self._at_ack, self._target_list, self._targets
        )  # fmt: skip
        for token, state in enumerate(outcome):
            if state == _ACKED_BIT:
                verdict.acknowledged += 1
                verdict.seen_in_memory += 1
            elif state == _FAILED:
                verdict.failed[self._code_list[self._codes[token]]] += 1
            elif state == _ACKED_GONE:
                verdict.acknowledged += 1
                verdict.unverifiable += 1
            elif state == _PENDING:
                verdict.unsettled.append(Item(token, *target_of[indices[token]], at_submit[token]))
            else:  # acknowledged, the bit was clear: the guest's counter must have moved
                verdict.acknowledged += 1
                key = target_of[indices[token]]
                if self._settle is not None:
                    final[key] = at_ack[token]  # settled at acknowledgement
                elif key not in final:
                    final[key] = self._guest_count(*key)
                if final[key] > at_submit[token]:
                    verdict.seen_by_counter += 1
                    verdict.counted_late += at_ack[token] <= at_submit[token]
                else:
                    verdict.lost.append(Item(token, *key, at_submit[token]))
        return verdict


def rounds_settle(rounds: Callable[[], int], *, timeout: float = 10.0) -> Callable[[], None]:
    """A ``settle`` for a guest that counts what it cleared within the polling round:
    wait (off any event loop's clock, the guest runs elsewhere) until ``rounds()``
    moved by two.  ``timeout`` only ends a hang (a stopped or parked guest)."""

    def settle() -> None:
        target = rounds() + 2
        deadline = time.monotonic() + timeout
        while rounds() < target and time.monotonic() < deadline:
            time.sleep(0.0001)  # let the guest's thread run

    return settle


def oracle_for(
    load: Callable[[int, int], int],
    bit_of: Callable[[str, int], tuple[int, int]],
    counts: Mapping[tuple[str, int], int],
    *,
    settle: Callable[[], None] | None = None,
) -> DeliveryOracle:
    """An oracle over guest memory read by ``load(gaddr, size)`` and a guest's ``counts``.

    ``bit_of(device, vector)`` gives ``(gaddr, mask)`` of the item's dsci bit;
    the test should work it out itself (from its layout), not take it from
    the product's adapter model.  ``counts`` is the guest's own mapping (for
    example :attr:`SimulatedGuest.counts`), read live.
    """

    def read_bit(device: str, vector: int) -> bool:
        gaddr, mask = bit_of(device, vector)
        return bool(load(gaddr, 1) & mask)

    def guest_count(device: str, vector: int) -> int:
        return counts.get((device, vector), 0)

    return DeliveryOracle(read_bit, guest_count, settle=settle)
