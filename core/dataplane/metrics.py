"""Prometheus metrics for one server (``GET /metrics``).

One process: a private ``CollectorRegistry`` per app (not the process-global one), so servers
built in one process — tests, several apps — neither share nor clash, and in-flight requests and
queue depth are read at scrape time. Worker processes (``--workers``): prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the parent before anything imports
prometheus_client — hence the lazy imports), so ``/metrics`` from any worker reports the whole
server; in-flight requests carry a ``pid`` label per worker. Health and metrics requests are not
counted as inference.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from core.types import ServedModel

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if self.multiprocess:
            self.requests = Counter(REQUESTS[0], REQUESTS[1], ["route", "model", "status"], registry=r)
            self.latency = Histogram(LATENCY[0], LATENCY[1], ["route", "model"],
                                     buckets=LATENCY_BUCKETS, registry=r)
            self.batch_size = Histogram(BATCH[0], BATCH[1], ["model"], buckets=BATCH_BUCKETS,
                                        registry=r)
            self.failed_items = Counter(FAILED[0], FAILED[1], ["model"], registry=r)
        else:
            # one process: plain counts kept by the event loop, exported at scrape time (no lock
            # and no label lookup per request)
            self.tally = Tally()
            r.register(self.tally)
            self.observe_request = self.tally.observe_request  # type: ignore[method-assign]
            self.observe_batch = self.tally.observe_batch  # type: ignore[method-assign]
            self.observe_failed = self.tally.observe_failed  # type: ignore[method-assign]
        self.in_flight = Gauge(
            "studio_requests_in_flight", "Inference requests being handled", registry=r,
            multiprocess_mode="liveall",
        )
        self.queue_depth = Gauge(
            "studio_queue_depth", "Requests admitted and not yet answered (bounded by --max-queue)",
            registry=r, multiprocess_mode="livesum",
        )
        self.load_seconds = Gauge(
            "studio_model_load_seconds", "Time to assemble the model", ["model"], registry=r,
            multiprocess_mode="livemax",
        )
        # an "info" metric as a gauge: prometheus-client's Info does not work across processes
        self.model_info = Gauge(
            "studio_model_info", "The served model", ["checkpoint", "key", "loader", "model"],
            registry=r, multiprocess_mode="livemax",
        )
        self._info_labels: dict[str, tuple[str, str, str, str]] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._batch_children: dict[str, Any] = {}

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        # labels() takes a lock and builds a key each call; the children are cached here.
        key = (route, model, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, model, str(status)),
                        self.latency.labels(route, model))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, model: str, rows: int) -> None:
        child = self._batch_children.get(model)
        if child is None:
            child = self._batch_children[model] = self.batch_size.labels(model)
        child.observe(rows)

    def observe_failed(self, model: str, items: int) -> None:
        self.failed_items.labels(model).inc(items)

    def describe_model(self, name: str, key: str, model: ServedModel, load_seconds: float) -> None:
        self.load_seconds.labels(name).set(load_seconds)
        labels = (model.checkpoint.name if model.checkpoint else "", key, model.platform, name)
        old = self._info_labels.get(name)
        if old is not None and old != labels:
            self.model_info.remove(*old)
        self._info_labels[name] = labels
        self.model_info.labels(*labels).set(1)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if not self.multiprocess:
            return bytes(generate_latest(self.registry))
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return bytes(generate_latest(registry))


REQUESTS = ("studio_requests", "Requests by route, model and status (all but health checks and "
            "/metrics)")
LATENCY = ("studio_request_duration_seconds", "Inference request latency")
BATCH = ("studio_batch_size", "Rows per model call")
FAILED = ("studio_failed_items", "Keys a model answered None for because they failed (a ModelPipe's "
          "items that raised or passed their deadline)")


class Tally:
    """Request counts and histograms in plain dicts, as a prometheus-client collector.

    Only the event loop's thread writes them, so no locks; ``collect`` runs at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.batches: dict[str, list[float]] = {}
        self.failed: dict[str, int] = {}

    # a histogram's counts: one per bucket, +Inf, then the sum (no helper call: every request)
    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        key = (route, model, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        counts = self.latency.get((route, model))
        if counts is None:
            counts = self.latency[route, model] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def observe_batch(self, model: str, rows: int) -> None:
        counts = self.batches.get(model)
        if counts is None:
            counts = self.batches[model] = [0.0] * (len(BATCH_BUCKETS) + 2)
        counts[bisect_left(BATCH_BUCKETS, rows)] += 1
        counts[-1] += rows

    def observe_failed(self, model: str, items: int) -> None:
        self.failed[model] = self.failed.get(model, 0) + items

    @staticmethod
    def _histogram(name: str, doc: str, labels: list[str], table: dict[Any, list[float]],
                   bounds: tuple[float, ...]) -> Any:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(name, doc, labels=labels)
        for key, counts in sorted(table.items()):
            cumulative, total = [], 0.0
            for bound, count in zip([*bounds, float("inf")], counts[:-1], strict=True):
                total += count
                cumulative.append((floatToGoString(bound), total))
            family.add_metric(list(key) if isinstance(key, tuple) else [key], cumulative,
                              sum_value=counts[-1])
        return family

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        requests = CounterMetricFamily(REQUESTS[0], REQUESTS[1], labels=["route", "model", "status"])
        for (route, model, status), count in sorted(self.requests.items()):
            requests.add_metric([route, model, str(status)], count)
        yield requests
        yield self._histogram(LATENCY[0], LATENCY[1], ["route", "model"], self.latency,
                              LATENCY_BUCKETS)
        yield self._histogram(BATCH[0], BATCH[1], ["model"], self.batches, BATCH_BUCKETS)
        failed = CounterMetricFamily(FAILED[0], FAILED[1], labels=["model"])
        for model, count in sorted(self.failed.items()):
            failed.add_metric([model], count)
        yield failed

    def describe(self) -> list[Any]:
        return list(self.collect())


def mark_worker_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (multiprocess mode)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid)
