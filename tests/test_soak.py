"""The CI soak: one minute of mixed load, faults and QEMU restarts against a real guest.

``make soak`` runs the same for ten minutes (SOAK_SECONDS).
"""

from __future__ import annotations

import logging
import os

import pytest

from indicators.testing.plugin import require_qemu
from indicators.testing.soak import run_soak

SECONDS = float(os.environ.get("INDICATORS_SOAK_SECONDS", "60"))


@pytest.mark.qemu
async def test_soak_loses_nothing_and_leaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    require_qemu()
    # Every failure is logged; pytest would keep thousands of records in memory.
    caplog.set_level(logging.ERROR, logger="indicators")
    report = await run_soak(SECONDS, round_seconds=10.0)
    print("\n" + "\n".join(report.lines()))
    assert report.rounds >= 2, "at least one QEMU restart"
    assert report.acknowledged > 0
    assert report.lost == 0, report.lines()
    assert report.faults["eagain"] > 0 and report.faults["protection"] > 0
    assert report.fds_end <= report.fds_start, "file descriptors leaked"
    assert report.rss_late_growth_kib < 32 * 1024, "memory kept growing in the second half"
