"""An adapter-interrupt integration test as a project outside this repository writes it.

It uses only what installing ``indicators`` provides: the ``indicators``
pytest plugin's fixtures and marker, its delivery oracle
(``indicators.testing.delivery``), and ``qemu.qmp``.  It runs under
pytest-asyncio's default (strict) mode, so the tests carry
``@pytest.mark.asyncio``.  tests/test_e2e.py runs a copy of this file with
pytest in an empty directory, away from this repository's conftest and
configuration.
"""

import asyncio

import pytest
from qemu.qmp import ExecuteError

from indicators.testing.delivery import notify

NET = {
    "name": "net0",
    "kind": "virtio-ccw",
    "summary_indicator": 0x30000,
    "device_indicator": 0x31000,
    "vectors": 8,
    "isc": 3,
    "key": 3,
}
BLK = {  # behind the same summary as net0
    "name": "blk0",
    "kind": "virtio-ccw",
    "summary_indicator": 0x30000,
    "device_indicator": 0x31001,
    "vectors": 8,
    "isc": 3,
    "key": 3,
}


@pytest.mark.asyncio
@pytest.mark.indicators_layout([NET, BLK])
async def test_every_notification_reaches_the_guest(
    indicators_rig, indicators_qmp, indicators_oracle
):
    for _ in range(20):
        assert await notify(indicators_qmp, indicators_oracle, "net0", [0, 1, 7])
        assert await notify(indicators_qmp, indicators_oracle, "blk0", [3])
    await indicators_rig.settle()
    verdict = indicators_oracle.verdict()
    assert verdict.ok and verdict.acknowledged == 80, verdict
    counts = await indicators_rig.park()
    assert set(counts) == {("net0", 0), ("net0", 1), ("net0", 7), ("blk0", 3)}


@pytest.mark.asyncio
@pytest.mark.indicators_layout([NET], storage_keys={0x30000: 0x30, 0x31000: 0x50})
async def test_a_wrong_storage_key_is_a_protection_exception(
    indicators_rig, indicators_guest, indicators_qmp
):
    keys = await indicators_rig.storage_keys()
    assert keys[0x31000].acc == 5
    before = indicators_guest.memory.read(0x31000, 1)
    with pytest.raises(ExecuteError, match=r"code 4"):
        await indicators_qmp.execute("notify", {"device": "net0", "vector": 2})
    assert indicators_guest.memory.read(0x31000, 1) == before


@pytest.mark.asyncio
async def test_default_layout_and_the_daemon_in_process(indicators_rig, indicators_daemon):
    client = await indicators_rig.client()
    adapters = await client.execute("query-adapters")
    assert [d["name"] for a in adapters for d in a["devices"]] == ["net0", "blk0", "pci0"]
    oracle = indicators_rig.oracle()
    tokens = oracle.submit_many([("pci0", 5), ("net0", 0)])
    errors = await indicators_daemon.engine.notify_many([("pci0", 5), ("net0", 0)])
    assert errors == [None, None]
    for token in tokens:
        oracle.acknowledged(token)
    await indicators_rig.settle()
    assert oracle.verdict().ok
    assert await indicators_rig.park() == {("pci0", 5): 1, ("net0", 0): 1}
    await indicators_rig.resume()
    await asyncio.wait_for(indicators_rig.guest.wait_rounds(10), 5)
