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
between the write and the acknowledgement).  The bit is sampled at
acknowledgement; the counter is compared only in :meth:`DeliveryOracle.verdict`,
once the guest has consumed everything, because a guest may clear a bit well
before it counts it.  An item with neither evidence is *lost*.

Use::

    oracle = DeliveryOracle(read_bit=..., guest_count=...)
    token = oracle.submit("net0", 2)
    ...                       # send it
    oracle.acknowledged(token)   # right when the acknowledgement arrives
    # or oracle.failed(token, "EAGAIN")
    ...                       # let the guest consume what is left
    verdict = oracle.verdict()
    assert verdict.ok, verdict
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["DeliveryOracle", "Item", "OracleError", "Verdict", "oracle_for"]

#: ``read_bit(device, vector)``: is the item's dsci bit set in guest memory now?
ReadBit = Callable[[str, int], bool]
#: ``guest_count(device, vector)``: how many times the guest consumed that bit.
GuestCount = Callable[[str, int], int]


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


@dataclass
class _State:
    item: Item
    outcome: str = "pending"  # "pending", "acknowledged" or "failed"
    bit_at_ack: bool = False
    code: str = ""


@dataclass
class Verdict:
    """What happened to every submitted item, judged from the caller and the guest."""

    submitted: int = 0
    acknowledged: int = 0
    #: acknowledged items whose bit was seen in memory at acknowledgement
    seen_in_memory: int = 0
    #: acknowledged items shown delivered only by the guest's counter
    seen_by_counter: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    #: submitted items neither acknowledged nor failed
    unsettled: list[Item] = field(default_factory=list)
    #: acknowledged items with no evidence of delivery
    lost: list[Item] = field(default_factory=list)

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
            f"guest counter moved {self.seen_by_counter})",
            f"failed by code: {failed}",
            f"lost (acknowledged, never reached the guest): {len(self.lost)}",
        ]
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

    def __init__(self, read_bit: ReadBit, guest_count: GuestCount) -> None:
        self._read_bit = read_bit
        self._guest_count = guest_count
        self._items: list[_State] = []
        self._lock = threading.Lock()

    def submit(self, device: str, vector: int) -> int:
        """Record an item about to be sent; returns its token."""
        count = self._guest_count(device, vector)
        with self._lock:
            token = len(self._items)
            self._items.append(_State(Item(token, device, vector, count)))
        return token

    def submit_many(self, items: Iterable[tuple[str, int]]) -> list[int]:
        """:meth:`submit` for each ``(device, vector)``, in order."""
        return [self.submit(device, vector) for device, vector in items]

    def _pending(self, token: int) -> _State:
        if not 0 <= token < len(self._items):
            raise OracleError(token, "not issued by this oracle")
        state = self._items[token]
        if state.outcome != "pending":
            raise OracleError(token, f"already {state.outcome}")
        return state

    def acknowledged(self, token: int) -> None:
        """The item was acknowledged: sample its bit now."""
        with self._lock:
            state = self._pending(token)
            state.outcome = "acknowledged"
        state.bit_at_ack = self._read_bit(state.item.device, state.item.vector)

    def failed(self, token: int, code: str) -> None:
        """The item was refused or failed with ``code`` (an errno name, PIC, ...)."""
        with self._lock:
            state = self._pending(token)
            state.outcome = "failed"
            state.code = str(code)

    def verdict(self) -> Verdict:
        """Judge every item; call once the guest has consumed all it will."""
        verdict = Verdict(submitted=len(self._items))
        final: dict[tuple[str, int], int] = {}
        for state in list(self._items):
            item = state.item
            if state.outcome == "failed":
                verdict.failed[state.code] += 1
            elif state.outcome == "pending":
                verdict.unsettled.append(item)
            elif state.bit_at_ack:
                verdict.acknowledged += 1
                verdict.seen_in_memory += 1
            else:
                verdict.acknowledged += 1
                key = (item.device, item.vector)
                if key not in final:
                    final[key] = self._guest_count(*key)
                if final[key] > item.count_at_submit:
                    verdict.seen_by_counter += 1
                else:
                    verdict.lost.append(item)
        return verdict


def oracle_for(
    load: Callable[[int, int], int],
    bit_of: Callable[[str, int], tuple[int, int]],
    counts: Mapping[tuple[str, int], int],
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

    return DeliveryOracle(read_bit, guest_count)
