"""Prometheus metrics for one server (``GET /metrics``), in a registry of its own.

A private ``CollectorRegistry`` per app (not the process-global one) keeps servers built in one
process — tests, several apps — from sharing or clashing. Health and metrics requests are not
counted as inference.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from core.types import ServedModel

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "studio_requests", "Inference requests by route, model and status",
            ["route", "model", "status"], registry=r,
        )
        self.latency = Histogram(
            "studio_request_duration_seconds", "Inference request latency",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "studio_requests_in_flight", "Inference requests being handled", registry=r
        )
        self.queue_depth = Gauge(
            "studio_queue_depth", "Requests admitted and not yet answered (bounded by --max-queue)",
            registry=r,
        )
        self.batch_size = Histogram(
            "studio_batch_size", "Rows per model call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.load_seconds = Gauge(
            "studio_model_load_seconds", "Time to assemble the model", ["model"], registry=r
        )
        self.model_info = Info("studio_model", "The served model", ["model"], registry=r)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._batch_children: dict[str, Histogram] = {}

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

    def describe_model(self, name: str, model: ServedModel, load_seconds: float) -> None:
        self.load_seconds.labels(name).set(load_seconds)
        self.model_info.labels(name).info(
            {
                "key": name,
                "loader": model.platform,
                "checkpoint": str(model.checkpoint.name) if model.checkpoint else "",
            }
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
