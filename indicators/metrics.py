"""An optional Prometheus endpoint over the engine's statistics.

The engine keeps plain counters (:class:`~indicators.stats.EngineStats`);
this module turns them into Prometheus metrics only when scraped, through a
custom collector, so the hot path pays nothing for observability:

- ``indicators_notifications_total``, ``..._applied_total``,
  ``..._merged_total``, ``..._cmpxchg_total``, ``..._no_xchg_total``,
  ``..._eagain_total``, interrupts injected / suppressed / coalesced;
- ``indicators_failures_total{code}``;
- per adapter (labels ``adapter``, ``isc``, ``kind``):
  ``indicators_adapter_notifications_total``, ``..._interrupts_total``,
  ``..._suppressed_total``, ``..._failures_total``;
- ``indicators_notify_latency_seconds``: a histogram from accepted to
  applied (buckets 5 us to 1 s, six per decade), and
  ``indicators_notify_latency_p50_seconds`` / ``..._p99_seconds``: the
  quantiles ``query-stats`` shows, interpolated within their bucket.

The endpoint listens on loopback by default (``[metrics] address, port``).
It serves at most ``MAX_HANDLERS`` connections at once (more are closed at
once) and gives each ``TIMEOUT`` seconds of socket inactivity, so slow or
idle connections cannot pile up threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .adapters import Adapter
from .stats import EngineStats

__all__ = ["EngineCollector", "serve_metrics"]

#: Connections served at once; more are closed without an answer.
MAX_HANDLERS = 4
#: Seconds a connection may stay silent (reading the request, taking the answer).
TIMEOUT = 5.0

_TOTALS = (
    ("notifications", "notifications", "Notifications accepted."),
    ("applied", "applied", "Notifications whose bit is in guest memory."),
    ("merged", "merged", "Notifications merged into a bit set in the same batch."),
    ("undone", "undone", "Dsci bits cleared again because their summary could not be set."),
    ("stranded", "stranded", "Such bits that could not be cleared (left behind a clear summary)."),
    ("interrupts_failed", "interrupts_failed", "Adapter interrupts the sink refused."),
    ("cmpxchg", "cmpxchg", "Backend cmpxchg calls."),
    ("no_xchg", "no_xchg", "Compare-failed rounds retried."),
    ("eagain", "eagain", "-EAGAIN results retried."),
    ("interrupts_injected", "interrupts_injected", "Adapter interrupts delivered."),
    ("interrupts_suppressed", "interrupts_suppressed", "Adapter interrupts suppressed (AIS)."),
    ("interrupts_coalesced", "interrupts_coalesced", "Interrupt decisions folded into another."),
)
_QUANTILES = ((0.5, "p50"), (0.99, "p99"))


class EngineCollector(Collector):
    """Reads the current engine's statistics at scrape time."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        adapters: Callable[[], dict[int, Adapter]],
    ) -> None:
        self._stats = stats
        self._adapters = adapters

    def collect(self) -> Iterator[Metric]:
        """The metric families of one scrape."""
        stats = self._stats()
        for attribute, name, doc in _TOTALS:
            yield CounterMetricFamily(f"indicators_{name}", doc, value=getattr(stats, attribute))
        failures = CounterMetricFamily(
            "indicators_failures", "Failed notifications by code.", labels=["code"]
        )
        for code, count in sorted(stats.failures.items()):
            failures.add_metric([code], count)
        yield failures
        yield from self._per_adapter(stats)
        buckets: list[tuple[str, float]] = [
            ("+Inf" if bound == float("inf") else repr(bound), float(count))
            for bound, count in stats.latency.cumulative()
        ]
        yield HistogramMetricFamily(
            "indicators_notify_latency_seconds",
            "Time from a notification's acceptance to its bit being in guest memory.",
            buckets=buckets,
            sum_value=stats.latency.total,
        )
        yield from self._quantiles(stats)

    def _quantiles(self, stats: EngineStats) -> Iterator[Metric]:
        # The same interpolated figures as query-stats, for a dashboard without
        # histogram_quantile; nothing observed yet (or past the last bucket)
        # leaves the gauge without a sample rather than a made-up number.
        for q, name in _QUANTILES:
            family = GaugeMetricFamily(
                f"indicators_notify_latency_{name}_seconds",
                f"Notify latency {name}, interpolated within its histogram bucket.",
            )
            value = stats.latency.quantile(q)
            if value is not None and value != float("inf"):
                family.add_metric([], value)
            yield family

    def _per_adapter(self, stats: EngineStats) -> Iterator[Metric]:
        labels = ["adapter", "isc", "kind"]
        families: dict[str, Any] = {
            field: CounterMetricFamily(f"indicators_adapter_{field}", doc, labels=labels)
            for field, doc in (
                ("notifications", "Notifications applied per adapter."),
                ("interrupts", "Interrupts delivered per adapter."),
                ("suppressed", "Interrupts suppressed per adapter."),
                ("failures", "Failures per adapter."),
            )
        }
        for adapter_id, adapter in sorted(self._adapters().items()):
            counters = stats.adapters.get(adapter_id)
            values = [str(adapter_id), str(adapter.isc), adapter.kind]
            for field, family in families.items():
                family.add_metric(values, getattr(counters, field) if counters else 0)
        yield from families.values()


class _Handler(WSGIRequestHandler):
    """One scrape: a socket timeout, and no access log."""

    timeout = TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (a scraper every few seconds would fill the log)."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``MAX_HANDLERS`` of them."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_HANDLERS)
        #: Connections closed because every handler was busy.
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_metrics(collector: EngineCollector, address: str, port: int) -> tuple[Any, int]:
    """Serve ``collector`` on ``http://address:port/metrics``; returns ((server, thread), port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    family, _, _, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_BoundedServer):
        address_family = family

    server = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), Server, _Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return (server, thread), server.server_address[1]
