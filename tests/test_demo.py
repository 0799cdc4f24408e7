"""The demo's verdict comes from the clients and the simulated guest, not from the engine."""

from __future__ import annotations

import pytest

from indicators.demo import run_demo


async def test_the_demo_says_every_acknowledged_notification_reached_the_guest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await run_demo(seconds=1.0, clients=2) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("every acknowledged notification"))
    assert "reached the guest: yes" in line and " 0 lost, 0 failed" in line
    acknowledged = int(line.split("(")[1].split(" acknowledged")[0].replace(",", ""))
    assert acknowledged > 1000, line
