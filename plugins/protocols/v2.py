"""The Open Inference Protocol (V2, KServe/Triton/MLServer) as routes on the server's data plane.

Everything goes through the ``ServingContext``: inference takes the same queue, deadlines,
batching, auth and metrics as ``POST /``, but in the model's named inputs and outputs
(``named=True``: ``ServedModel.predict_named``) where ``POST /`` keeps the seed's key-for-key
contract. ``/v2/health/live|ready`` belong to the core app.

Versions: a model is served in one version at a time, named ``"1"``; a reload replaces it in
place (the served checkpoint is in the metadata's ``parameters``). ``/versions/1/...`` is the
same as the unversioned route; any other version is a 404.

Extensions: ``binary_tensor_data`` and ``model_repository`` (index, load — optionally from
another experiment key or checkpoint: ``{"parameters": {"key": K, "checkpoint": C}}`` — and
unload).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from studio_plugins import (
    BadRequest,
    ClientGone,
    ModelState,
    NotFound,
    Payload,
    Reply,
    RouteFactory,
    ServedModel,
    ServingContext,
    TensorSpec,
    decode_off_loop,
    error_reply,
    failed_headers,
    hookimpl,
)

from .v2_limits import short
from .v2_messages import encode_response, header_length, parse_request
from .v2_tensors import DATATYPES

log = logging.getLogger("studio_plugins.v2")

VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "model_repository")
# ModelState.state -> the repository extension's states (Triton's names)
REPOSITORY_STATES = {
    "ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE", "unloaded": "UNAVAILABLE",
}
JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/octet-stream"
# a tensor's datatype as the protocol (and Triton's BF16) names it; loaders may say UNKNOWN
METADATA_DATATYPES = frozenset((*DATATYPES, "BF16"))


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def check_version(name: str, version: str | None) -> None:
    if version is not None and version != VERSION:
        raise NotFound(f"model {name!r} has no version {version!r}; it serves version {VERSION}")


def check_inputs(name: str, model: ServedModel | None, inputs: Payload) -> None:
    """Where the model declares its inputs, one it does not have (or one it needs and was not
    sent) is a 400 that names them all, as Triton and MLServer answer: not a model failure."""
    if model is None or not model.inputs:
        return
    declared = [spec.name for spec in model.inputs]
    unknown = [key for key in inputs if key not in declared]
    missing = [key for key in declared if key not in inputs]
    if not unknown and not missing:
        return
    takes = ", ".join(_takes(spec) for spec in model.inputs)
    if unknown:
        raise BadRequest(f"model {name!r} has no input {short(unknown[0])}; its inputs: {takes}")
    raise BadRequest(f"model {name!r} needs input {missing[0]!r} too; its inputs: {takes}")


def _takes(spec: TensorSpec) -> str:
    if spec.datatype not in METADATA_DATATYPES:
        return repr(spec.name)
    return f"{spec.name!r} ({spec.datatype} {list(spec.shape)})"


class InferEndpoint:
    """Run a model on V2 input tensors (JSON, or binary with Inference-Header-Content-Length).
    The reply has the model's outputs as V2 tensors, binary when the request asked for them so.

    ``POST /v2/models/{name}[/versions/{version}]/infer`` as plain ASGI (the hot path: no Request
    object, a bounded body read, orjson both ways). The first paragraph above is the route's
    description in ``/openapi.json``."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context
        self.names = frozenset(context.model_names())  # a server's set of models is fixed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        params = scope["path_params"]
        name: str = params["name"]
        context = self.context
        try:
            if name not in self.names:  # 404 for an unknown model before reading its body
                context.state(name)
            context.record(scope, name)  # only known names: metric labels stay bounded
            check_version(name, params.get("version"))
            headers = dict(scope["headers"])
            body = await context.read_body(receive, headers.get(b"content-length"))
            json_length = header_length(headers.get(b"inference-header-content-length"))
            request = await decode_off_loop(
                lambda data, limit: parse_request(data, json_length, limit=limit), body, context.max_body)
            check_inputs(name, context.state(name).model, request.inputs)
            result, rows = await context.infer(name, request.inputs, receive, named=True)
            context.record(scope, name, rows)
            reply, json_length = encode_response(name, VERSION, request, result)
        except ClientGone:
            log.info("POST %s: client disconnected; request dropped", scope["path"])
            context.record(scope, name, status=499)
            return
        except Exception as exc:  # a StudioError, or a bug of ours (logged, never shown)
            await error_reply(exc, scope).send(send)
            return
        if json_length is None:
            reply_headers = [(b"content-type", JSON_TYPE)]
        else:
            reply_headers = [(b"content-type", BINARY_TYPE),
                             (b"inference-header-content-length", str(json_length).encode())]
        if isinstance(result, Reply) and result.failed:  # the outputs left out, and why
            reply_headers += failed_headers(result.failed)
        await _send(send, 200, reply, reply_headers)


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class V2Routes:
    """The metadata, readiness and repository routes (GET and control: not the hot path)."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    def routes(self) -> list[BaseRoute]:
        infer = InferEndpoint(self.context)
        # inference first: the router tries routes in order
        routes: list[BaseRoute] = [
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
        ]
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                Route(base, self.model_metadata, methods=["GET"]),
                Route(base + "/ready", self.model_ready, methods=["GET"]),
            ]
        routes += [
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
            Route("/v2/repository/models/{name}/load", self.load, methods=["POST"]),
            Route("/v2/repository/models/{name}/unload", self.unload, methods=["POST"]),
        ]
        return routes

    def _state(self, request: Request) -> ModelState:
        name = request.path_params["name"]
        state = self.context.state(name)
        self.context.record(request.scope, name)
        check_version(name, request.path_params.get("version"))
        return state

    async def _json_body(self, request: Request) -> Mapping[str, Any]:
        headers = dict(request.scope["headers"])
        body = await self.context.read_body(request.receive, headers.get(b"content-length"))
        if not body.strip():
            return {}
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(message, dict):
            raise BadRequest("the request body must be a JSON object")
        return message

    async def server_metadata(self, request: Request) -> Response:
        """Server metadata: name, version and the protocol extensions it supports."""
        context = self.context
        return json_response(
            {"name": context.server_name, "version": context.version, "extensions": list(EXTENSIONS)}
        )

    async def model_metadata(self, request: Request) -> Response:
        """A model's metadata: platform, inputs and outputs (names, datatypes, shapes)."""
        state = self._state(request)
        model = state.model
        inputs = _tensors(model.inputs) if model is not None else []
        outputs = _tensors(model.outputs) if model is not None else []
        parameters = _describe(state)
        # a tensor needs a datatype and a shape: where the model does not say them (a scripted
        # TorchScript module), its list is empty and the parameters say it is unknown
        if inputs is None:
            parameters["inputs_known"] = False
        if outputs is None:
            parameters["outputs_known"] = False
        metadata: dict[str, Any] = {
            "name": state.name,
            "versions": [VERSION],
            "platform": model.platform if model is not None else "",
            "inputs": inputs or [],
            "outputs": outputs or [],
            "parameters": parameters,
        }
        return json_response(metadata)

    async def model_ready(self, request: Request) -> Response:
        """Whether the model is ready: 200 when it is, 400 when it is not."""
        state = self._state(request)
        # The protocol: 200 means ready, a 4xx means not.
        return json_response({"name": state.name, "ready": state.ready}, 200 if state.ready else 400)

    async def repository_index(self, request: Request) -> Response:
        """The models and their states (``{"ready": true}``: the ready ones only)."""
        message = await self._json_body(request)
        only_ready = message.get("ready", False)
        if not isinstance(only_ready, bool):
            raise BadRequest("ready must be true or false")
        index = []
        for name in self.context.model_names():
            state = self.context.state(name)
            if only_ready and not state.ready:
                continue
            entry = {"name": name, "version": VERSION, "state": REPOSITORY_STATES.get(state.state, "UNKNOWN")}
            reason = state.error or ("unloaded" if state.state == "unloaded" else "")
            entry["reason"] = reason
            index.append(entry)
        return json_response(index)

    async def load(self, request: Request) -> Response:
        """(Re)load a model, optionally from another experiment key or checkpoint
        ``{"parameters": {"key": K, "checkpoint": C}}``; swapped in once it is ready."""
        name = request.path_params["name"]
        self.context.state(name)  # 404 for an unknown name
        parameters = (await self._json_body(request)).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest("parameters must be an object")
        unsupported = [p for p in parameters if p == "config" or p.startswith("file:")]
        if unsupported:
            raise BadRequest(
                f"load parameter {unsupported[0]!r} is not supported",
                hint='name an experiment or a checkpoint: {"parameters": {"key": K, "checkpoint": C}}',
            )
        key, checkpoint = parameters.get("key"), parameters.get("checkpoint")
        for label, value in (("key", key), ("checkpoint", checkpoint)):
            if value is not None and not isinstance(value, str):
                raise BadRequest(f"load parameter {label!r} must be a string")
        state = await self.context.load(name, key, checkpoint)
        return json_response({"name": name, "state": REPOSITORY_STATES[state.state], **_describe(state)})

    async def unload(self, request: Request) -> Response:
        """Unload a model: it answers 503 until it is loaded again."""
        name = request.path_params["name"]
        self.context.state(name)
        await self._json_body(request)  # unload_dependents and the like: nothing depends on a model
        state = await self.context.unload(name)
        return json_response({"name": name, "state": REPOSITORY_STATES[state.state], **_describe(state)})


def fully_declared(specs: Sequence[TensorSpec]) -> bool:
    """Whether every tensor has a V2 datatype: metadata lists a model's tensors only then (a
    tensor needs a datatype and a shape), over HTTP and gRPC alike."""
    return all(spec.datatype in METADATA_DATATYPES for spec in specs)


def _tensors(specs: Sequence[TensorSpec]) -> list[dict[str, Any]] | None:
    """Metadata tensors, or None when one of them is not known (no V2 datatype)."""
    if not fully_declared(specs):
        return None
    return [{"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)} for spec in specs]


def _describe(state: ModelState) -> dict[str, Any]:
    """What is served: the experiment key, the checkpoint file (when there is one), the state."""
    described: dict[str, Any] = {"experiment": state.key, "state": state.state}
    model = state.model
    if model is not None and model.checkpoint is not None:
        described["checkpoint"] = model.checkpoint.name
    return described


def v2_routes(context: ServingContext) -> Sequence[BaseRoute]:
    return V2Routes(context).routes()


@hookimpl
def studio_register_routes(register: Callable[[RouteFactory], None]) -> None:
    register(v2_routes)
