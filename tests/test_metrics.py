"""The Prometheus endpoint of a running daemon: counters move as notifications land."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import QMPClient

from indicators import metrics
from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.demo import DEMO_CONFIG
from indicators.metrics import EngineCollector
from indicators.stats import EngineStats


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


def test_slow_connections_cannot_pile_up_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle connections hold at most MAX_HANDLERS threads; the others are hung up on."""
    monkeypatch.setattr(metrics._Handler, "timeout", 30.0)  # they stay while we look
    collector = EngineCollector(EngineStats, dict)
    (server, thread), port = metrics.serve_metrics(collector, "127.0.0.1", 0)
    idle: list[socket.socket] = []
    try:
        for _ in range(30):  # connect and say nothing
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        deadline = time.monotonic() + 30
        while server.refused < 30 - metrics.MAX_HANDLERS:
            assert time.monotonic() < deadline, f"only {server.refused} hung up on"
            time.sleep(0.01)
        # Its handler threads (named after their target): other tests' threads may come and go.
        handlers = [t for t in threading.enumerate() if "process_request_thread" in t.name]
        assert 0 < len(handlers) <= metrics.MAX_HANDLERS, handlers
    finally:
        for sock in idle:
            sock.close()
    try:
        assert "indicators_notifications_total" in str(scrape(port))  # served again
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_silent_connection_is_hung_up_on_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert metrics._Handler.timeout == metrics.TIMEOUT  # what a real scrape gets
    monkeypatch.setattr(metrics._Handler, "timeout", 0.2)
    (server, thread), port = metrics.serve_metrics(
        EngineCollector(EngineStats, dict), "127.0.0.1", 0
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            assert silent.recv(1) == b""  # the server gave up on it, not we
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
