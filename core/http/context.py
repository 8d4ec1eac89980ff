"""The ``ServingContext`` route plugins get: the server's models and its data plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from starlette.types import Receive

from core.dataplane.plane import DataPlane
from core.errors import Conflict, NotReady
from core.http.activity import Activity
from core.http.bearer import bearer_matches
from core.http.body import BodyReader, ClientGone
from core.http.counting import RequestCounter
from core.http.disconnects import DisconnectWatch
from core.http.record import SCOPE_KEY, RequestRecord
from core.models.repository import ModelRepository
from core.types import ModelReply, ModelState, Payload, ServedModel
from core.version import __version__

log = logging.getLogger("studio_plugins.repository")


class ServerContext:
    server_name = "studio-plug"
    version = __version__

    def __init__(self, repository: ModelRepository, dataplane: DataPlane, bodies: BodyReader,
                 in_worker: bool = False, *, token: str | None = None,
                 activity: Activity | None = None) -> None:
        self.repository = repository
        self.dataplane = dataplane
        self.in_worker = in_worker
        self.default_model = repository.names()[0]
        self.bodies = bodies
        self.max_body = bodies.limit  # the app's --max-body: its one source (AppSettings)
        self.disconnects = DisconnectWatch()
        self._token = token.encode() if token else None
        self.activity = activity or Activity()
        self.counter = RequestCounter(self.activity, dataplane.metrics, repository)
        self.is_ready: Callable[[], bool] = repository.any_ready
        """The app's readiness (``GET /v2/health/ready``): build_app sets it."""

    def read_body(self, receive: Receive, declared: bytes | None) -> Awaitable[bytes]:
        """The request's body under the server's limits (core/http/body.py: ``BodyReader``)."""
        return self.bodies.read(receive, declared)

    def model_names(self) -> list[str]:
        return self.repository.names()

    def state(self, name: str) -> ModelState:
        return self.repository.state(name)

    def ready_model(self, name: str) -> ServedModel:
        """The model serving ``name`` now (read once per request: swaps are atomic)."""
        slot = self.repository.slot(name)
        model = slot.model
        if model is None:
            reason = f": {slot.error}" if slot.error else ""
            raise NotReady(f"model {name!r} is not ready ({slot.state}){reason}")
        return model

    async def infer(self, name: str, payload: Payload, receive: Receive | None = None, *,
                    named: bool = False) -> ModelReply:
        return await self.run(self.ready_model(name), name, payload, receive, named=named)

    async def run(self, model: ServedModel, name: str, payload: Payload, receive: Receive | None = None,
                  *, named: bool = False, task: asyncio.Task[Any] | None = None) -> ModelReply:
        """``model``'s reply through the data plane and the rows of its call. Given the request's
        ``receive``, a client that disconnects meanwhile cancels it: ``ClientGone`` is raised.
        ``named``: call ``model.predict_named`` (V2's named tensors) rather than ``predict``.
        ``task``: the request's, when the caller has it already."""
        if receive is None:
            return await self.dataplane.infer(model, payload, name, named=named)
        task = self.disconnects.enter(receive, task)
        try:
            return await self.dataplane.infer(model, payload, name, named=named)
        except asyncio.CancelledError:
            if not self.disconnects.absorb(task):
                raise
            raise ClientGone() from None
        finally:
            self.disconnects.leave(task)

    def _refuse_in_worker(self) -> None:
        # one worker swapping its own copy would leave the others serving the old model
        if self.in_worker:
            raise Conflict(
                "loading and unloading models is not available with --workers",
                hint="use --watch: the parent loads a new checkpoint once and re-forks every worker",
            )

    async def load(self, name: str, key: str | None = None, checkpoint: str | None = None) -> ModelState:
        self._refuse_in_worker()  # before the log line: a refused load must not read as started
        log.info("loading model %s%s%s", name, f" from experiment {key}" if key else "",
                 f", checkpoint {checkpoint}" if checkpoint else "")
        return await asyncio.to_thread(self.repository.load, name, key, checkpoint)

    async def unload(self, name: str) -> ModelState:
        self._refuse_in_worker()
        return await asyncio.to_thread(self.repository.unload, name)

    def authorized(self, authorization: bytes | str | None) -> bool:
        """Whether a request whose ``Authorization`` value is ``authorization`` passes ``--token``
        (always, without one): ``Bearer <token>``, the scheme case-insensitive (RFC 7235), the
        token compared in constant time, as the HTTP app checks it."""
        return self._token is None or bearer_matches(authorization, self._token)

    def ready(self) -> bool:
        return self.is_ready()

    @contextlib.contextmanager
    def counted(self, route: str) -> Iterator[dict[str, Any]]:
        """Count a request that did not come through the HTTP app (gRPC's) as the app counts its
        own (core/http/counting.py), under ``route`` with the model and status given to
        ``record`` (status 500 unless it says otherwise). Yields the scope ``record`` takes."""
        record = RequestRecord(b"", {}, route)
        started = self.counter.start()
        try:
            yield {SCOPE_KEY: record}
        finally:
            self.counter.finish(route, record.model, record.status, started)

    def record(self, scope: Any, model: str, rows: int | None = None, *, status: int | None = None) -> None:
        record: RequestRecord | None = scope.get(SCOPE_KEY)
        if record is not None:
            record.model = model
            if rows is not None:
                record.batch = rows
            if status is not None:
                record.status = status
