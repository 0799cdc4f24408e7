"""What the soak calls a failure, without QEMU: its judgement of one round's verdict."""

from __future__ import annotations

from collections import Counter

import pytest

from indicators.testing.oracle import Item, Verdict
from indicators.testing.soak import (
    BLOCKS_PER_REQUEST,
    HEAP_BYTES_PER_REQUEST,
    SoakReport,
    _judge,
)

EAGAIN_ROUND, PROTECTION_ROUND, CLEAN_ROUND = 0, 1, 2


def verdict(acknowledged: int = 1000, **failed: int) -> Verdict:
    return Verdict(
        submitted=acknowledged + sum(failed.values()),
        acknowledged=acknowledged,
        seen_in_memory=acknowledged,
        failed=Counter({code.replace("_at_", "@"): n for code, n in failed.items()}),
    )


def judged(round_number: int, v: Verdict) -> SoakReport:
    report = SoakReport(requests=100, fds_start=10, fds_end=10)
    _judge(report, v, round_number)
    return report


def test_a_clean_round_passes() -> None:
    report = judged(CLEAN_ROUND, verdict())
    assert report.problems() == []
    assert report.acknowledged == 1000


def test_injected_protection_explains_code_4_in_the_protected_window_only() -> None:
    ok = judged(PROTECTION_ROUND, verdict(**{"4_at_blk0": 300, "4_at_net0": 20}))
    assert ok.problems() == [] and ok.failures == {"4": 320}
    elsewhere = judged(PROTECTION_ROUND, verdict(**{"4_at_pci0": 1}))
    assert "failures no injected fault explains" in elsewhere.problems()[0]
    assert judged(CLEAN_ROUND, verdict(**{"4_at_blk0": 1})).problems() != []


def test_eagain_failures_are_explained_only_in_eagain_rounds_and_only_a_few() -> None:
    assert judged(EAGAIN_ROUND, verdict(**{"EAGAIN_at_net0": 5})).problems() == []
    most = judged(EAGAIN_ROUND, verdict(acknowledged=100, **{"EAGAIN_at_net0": 900}))
    assert "EAGAIN beyond 1%" in most.problems()[0]
    assert judged(PROTECTION_ROUND, verdict(**{"EAGAIN_at_net0": 1})).problems() != []


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL", "NO_XCHG_LIMIT", "socket EOFError"])
def test_codes_no_fault_explains_fail_the_soak(code: str) -> None:
    report = judged(EAGAIN_ROUND, verdict(**{f"{code}_at_net0": 1}))
    assert report.problems() and code in report.problems()[0]


def test_lost_and_unsettled_items_fail_the_soak() -> None:
    v = verdict()
    v.lost = [Item(7, "net0", 3, 0)]
    v.unsettled = [Item(8, "pci0", 1, 0)]
    report = judged(CLEAN_ROUND, v)
    assert report.lost == 2
    assert "2 acknowledged notifications never reached the guest" in report.problems()
    assert "round 2: net0 vector 3" in "\n".join(report.lines())


def test_nothing_acknowledged_fails_the_soak() -> None:
    assert "nothing was acknowledged" in judged(CLEAN_ROUND, verdict(acknowledged=0)).problems()


def test_a_10_kib_per_request_leak_is_caught_and_noise_is_not() -> None:
    report = SoakReport(acknowledged=1, measured_requests=15_000)
    report.heap_growth = 15_000 * 10 * 1024  # 10 KiB for each of 15,000
    assert report.heap_bytes_per_request == 10 * 1024
    assert "live memory grew 10240 bytes per request" in report.problems()[0]
    report.heap_growth = 2 << 20  # 2 MiB of allocator noise
    assert report.heap_bytes_per_request < HEAP_BYTES_PER_REQUEST
    assert report.problems() == []


def test_an_object_kept_per_request_is_caught() -> None:
    report = SoakReport(acknowledged=1, measured_requests=15_000, blocks_growth=16_500)
    assert report.blocks_per_request == 1.1 > BLOCKS_PER_REQUEST
    assert "live objects grew 1.10 per request" in report.problems()[0]


def test_rss_alone_fails_nothing() -> None:
    """RSS keeps the allocator's high-water mark after a flood of failures: reported,
    but live memory decides."""
    report = SoakReport(acknowledged=1, requests=20_000, requests_at_start=5_000)
    report.rss_start_kib, report.rss_end_kib = 200_000, 500_000
    assert report.rss_bytes_per_request > 10_000 and report.problems() == []


def test_leaked_file_descriptors_fail_the_soak() -> None:
    report = SoakReport(acknowledged=1, fds_start=14, fds_end=15)
    assert report.problems() == ["file descriptors leaked: 14 -> 15"]
