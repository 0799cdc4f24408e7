"""The CI soak: one minute of mixed load, faults and QEMU restarts against a real guest.

``make soak`` runs the same for ten minutes (SOAK_SECONDS).  What the soak
report's ``problems()`` flags is tested on its own in test_soak_report.py.
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
    # Lost, unexpected failure codes, leaked fds, memory per request: see problems().
    assert report.problems() == [], "\n".join(report.lines())
    assert report.restarts >= 1, "at least one QEMU restart"
    assert report.faults["eagain"] > 0 and report.faults["protection"] > 0
    assert report.failures["4"] > 0, "the protected window refused its notifications"
    assert report.seen_in_memory > 0 and report.seen_by_counter > 0
