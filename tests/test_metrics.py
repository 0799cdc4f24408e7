"""The Prometheus endpoint of a running daemon: counters move as notifications land."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import QMPClient

from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.demo import DEMO_CONFIG


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


async def test_metrics_follow_the_engine(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "control.sock")
    config = parse_config(
        {**DEMO_CONFIG, "control": {"socket": socket_path}, "metrics": {"port": 0}}
    )
    service = Service(config)
    await service.start()
    try:
        assert service.metrics_port
        before = await asyncio.to_thread(scrape, service.metrics_port)
        assert before["indicators_notifications_total{}"] == 0
        client = QMPClient("metrics-test")
        await client.connect(socket_path)
        await client.execute("notify", {"device": "virtio-net0", "vector": [0, 1, 2]})
        await client.execute("notify", {"device": "pci1", "vector": 5})
        await client.disconnect()
        after = await asyncio.to_thread(scrape, service.metrics_port)
    finally:
        await service.stop()
    assert after["indicators_notifications_total{}"] == 4
    assert after["indicators_applied_total{}"] == 4
    assert after["indicators_cmpxchg_total{}"] >= 4, "two windows and two summaries at least"
    assert after["indicators_interrupts_injected_total{}"] == 2
    assert after["indicators_adapter_notifications_total{adapter=3,isc=3,kind=virtio-ccw}"] == 3
    assert after["indicators_adapter_interrupts_total{adapter=10,isc=2,kind=zpci}"] == 1
    assert after["indicators_notify_latency_seconds_count{}"] == 4
    assert after["indicators_notify_latency_seconds_bucket{le=+Inf}"] == 4
    assert 0 < after["indicators_notify_latency_seconds_sum{}"] < 5
