"""The reboot torture (issue 15 items 4, 5), short: real QEMU guest, real daemon socket.

The long run is ``make soak`` (``python -m indicators.testing.reboot``).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from indicators.testing.build import skip_reason
from indicators.testing.reboot import torture

REBOOTS = 40


def _require_tools() -> None:
    reason = skip_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


async def test_reboot_torture_no_stray_byte_nothing_lost() -> None:
    _require_tools()
    report = await asyncio.wait_for(torture(REBOOTS), 120)
    assert report.reboots == REBOOTS, report.lines()
    assert report.checks == REBOOTS - 1, report.lines()
    assert report.notifications > 0 and report.set_bits > 0, report.lines()
    assert report.stray_bytes == 0, report.lines()
    assert report.lost == 0 and report.extra == 0, report.lines()
