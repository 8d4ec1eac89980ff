"""Counting a request, whichever protocol brought it: in flight (for ``--killafter`` and the
drain), and in the metrics by route, model and status when it ends.

The HTTP app's edge middleware counts its requests here, and so does ``ServingContext.counted``
for the protocols that do not come through it (gRPC), so both are counted by the same rules.
"""

from __future__ import annotations

import time

from core.dataplane.metrics import Metrics
from core.http.activity import Activity
from core.models.repository import ModelRepository

UNKNOWN_MODEL = ""
"""The model label of a request for a name the repository does not have."""


class RequestCounter:
    def __init__(self, activity: Activity, metrics: Metrics | None, repository: ModelRepository
                 ) -> None:
        self.activity = activity
        self.metrics = metrics
        self.repository = repository
        # across worker processes the in-flight gauge is counted; in one it is read at scrape time
        self.count_in_flight = metrics is not None and metrics.multiprocess

    def start(self) -> float:
        """A request starts: in flight from now. Returns its start, for ``finish``."""
        self.activity.started()
        if self.count_in_flight:
            self.metrics.in_flight.inc()  # type: ignore[union-attr]
        return time.perf_counter()

    def finish(self, route: str, model: str | None, status: int, started: float) -> float:
        """The request ``start`` started has ended; returns the seconds it took."""
        elapsed = time.perf_counter() - started
        self.activity.finished()
        metrics = self.metrics
        if metrics is not None:
            if self.count_in_flight:
                metrics.in_flight.dec()
            # a label only for the names the repository has now: any other name a client
            # sends would be a new series (2000 unknown names made /metrics 41 MB)
            label = model if model in self.repository.slots else UNKNOWN_MODEL
            metrics.observe_request(route, label, status, elapsed)
        return elapsed
