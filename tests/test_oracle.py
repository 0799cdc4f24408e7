"""The delivery oracle itself: it finds what was lost and only that."""

from __future__ import annotations

from collections import Counter

import pytest

from indicators.testing.oracle import DeliveryOracle, OracleError, oracle_for


class FakeGuest:
    """Bits and counters the test sets by hand."""

    def __init__(self) -> None:
        self.bits: set[tuple[str, int]] = set()
        self.counts: Counter[tuple[str, int]] = Counter()

    def read_bit(self, device: str, vector: int) -> bool:
        return (device, vector) in self.bits

    def count(self, device: str, vector: int) -> int:
        return self.counts[(device, vector)]

    def consume(self, device: str, vector: int) -> None:
        self.bits.discard((device, vector))
        self.counts[(device, vector)] += 1


@pytest.fixture
def guest() -> FakeGuest:
    return FakeGuest()


@pytest.fixture
def oracle(guest: FakeGuest) -> DeliveryOracle:
    return DeliveryOracle(guest.read_bit, guest.count)


def test_bit_in_memory_at_acknowledgement_is_delivered(guest, oracle):
    token = oracle.submit("net0", 2)
    guest.bits.add(("net0", 2))
    oracle.acknowledged(token)
    guest.bits.clear()  # cleared later without counting: the bit was seen
    verdict = oracle.verdict()
    assert verdict.ok, verdict
    assert (verdict.acknowledged, verdict.seen_in_memory, verdict.lost) == (1, 1, [])


def test_counter_moving_after_submission_is_delivered(guest, oracle):
    token = oracle.submit("net0", 2)
    guest.bits.add(("net0", 2))
    guest.consume("net0", 2)  # consumed before the acknowledgement arrived
    oracle.acknowledged(token)
    verdict = oracle.verdict()
    assert verdict.ok, verdict
    assert verdict.seen_by_counter == 1


def test_counter_may_move_after_acknowledgement(guest, oracle):
    """The guest may clear the bit, then count it after the caller sampled memory."""
    token = oracle.submit("net0", 2)
    oracle.acknowledged(token)  # bit already cleared, not yet counted
    guest.counts[("net0", 2)] += 1
    assert oracle.verdict().ok


def test_acknowledged_without_evidence_is_lost(guest, oracle):
    guest.consume("net0", 2)  # an earlier delivery: before submission, no evidence
    token = oracle.submit("net0", 2)
    oracle.acknowledged(token)
    verdict = oracle.verdict()
    assert not verdict.ok
    assert [(i.device, i.vector) for i in verdict.lost] == [("net0", 2)]
    assert "lost (acknowledged, never reached the guest): 1" in str(verdict)
    assert "lost net0 vector 2" in str(verdict)


def test_another_vectors_counter_is_no_evidence(guest, oracle):
    token = oracle.submit("net0", 2)
    guest.consume("net0", 3)
    guest.consume("net1", 2)
    guest.bits.add(("net0", 1))
    oracle.acknowledged(token)
    assert len(oracle.verdict().lost) == 1


def test_bit_set_after_acknowledgement_is_no_evidence(guest, oracle):
    token = oracle.submit("net0", 2)
    oracle.acknowledged(token)
    guest.bits.add(("net0", 2))  # too late: the promise is "in memory at acknowledgement"
    assert len(oracle.verdict().lost) == 1


def test_failures_are_counted_by_code_and_never_lost(guest, oracle):
    a, b, c = oracle.submit_many([("net0", 0), ("net0", 1), ("pci0", 4)])
    oracle.failed(a, "EAGAIN")
    oracle.failed(b, "EAGAIN")
    oracle.failed(c, "EPERM")
    verdict = oracle.verdict()
    assert verdict.ok
    assert verdict.failed == {"EAGAIN": 2, "EPERM": 1}
    assert verdict.acknowledged == 0
    assert verdict.unexpected_failures({"EAGAIN"}) == {"EPERM": 1}
    assert "failed by code: EAGAIN: 2, EPERM: 1" in str(verdict)


def test_unsettled_items_fail_the_verdict(oracle):
    oracle.submit("net0", 0)
    verdict = oracle.verdict()
    assert not verdict.ok
    assert "unsettled" in str(verdict)


def test_a_token_settles_once(oracle):
    token = oracle.submit("net0", 0)
    oracle.acknowledged(token)
    with pytest.raises(OracleError, match="already acknowledged"):
        oracle.failed(token, "EAGAIN")
    with pytest.raises(OracleError, match="not issued"):
        oracle.acknowledged(99)


def test_one_consumption_covers_every_item_merged_into_it(guest, oracle):
    """Notifications merged into one set bit are one interrupt: one count covers them."""
    tokens = oracle.submit_many([("net0", 5)] * 3)
    guest.bits.add(("net0", 5))
    guest.consume("net0", 5)
    for token in tokens:
        oracle.acknowledged(token)
    verdict = oracle.verdict()
    assert verdict.ok and verdict.acknowledged == 3


def test_oracle_for_reads_memory_bits_and_live_counts():
    memory = bytearray(16)
    counts: Counter[tuple[str, int]] = Counter()
    oracle = oracle_for(
        lambda gaddr, size: memory[gaddr],
        lambda device, vector: (8 + vector // 8, 0x80 >> (vector % 8)),
        counts,
    )
    seen, counted, lost = oracle.submit_many([("d", 9), ("d", 0), ("d", 1)])
    memory[9] = 0x40  # vector 9: byte 9, MSB-0 bit 1
    oracle.acknowledged(seen)
    counts[("d", 0)] += 1
    oracle.acknowledged(counted)
    memory[8] = 0x80  # vector 0's bit, not vector 1's
    oracle.acknowledged(lost)
    verdict = oracle.verdict()
    assert (verdict.seen_in_memory, verdict.seen_by_counter) == (1, 1)
    assert [(i.device, i.vector) for i in verdict.lost] == [("d", 1)]
