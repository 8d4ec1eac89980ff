"""``inference.GRPCInferenceService`` on a server's ``ServingContext``: V2 over gRPC.

The same mechanism as the HTTP routes (plugins/protocols/v2.py): inference goes through the data
plane (queue, ``--timeout``, batching, metrics) with the model's named tensors, repository
load/unload through the context, the same checks and the same refusals (plugins/protocols/grpc/
status.py maps them). What the HTTP app's edge does for its routes is done here per call:

- ``--token``: the ``authorization: Bearer <token>`` metadata, on every call but ServerLive and
  ServerReady (like ``/v2/health/*``);
- counting: in flight (``--killafter``, draining) and in the metrics, under the route
  ``/inference.GRPCInferenceService/<Method>`` with the HTTP status the answer stands for;
- the request message is read by the handler, after the token check (the methods are
  stream-unary on the wire, which a unary client cannot tell apart: the same frames), so a call
  without the token has nothing of its message buffered, and a message must be whole within
  ``--read-timeout``, else the call ends with ``DEADLINE_EXCEEDED`` and its buffer is freed: a
  call that stalls mid-message is no longer held until its connection closes. gRPC shows no
  progress within a message, so ``--min-rate`` cannot extend that time as it does for a body;
- a client's deadline bounds ModelInfer as ``--timeout`` does (the smaller wins); a cancelled
  call is cancelled on the data plane too (grpc cancels the handler's task): it stops counting
  against ``--max-queue``, and is counted 499 like an HTTP client that went away.

Implemented: the health, metadata (ModelConfig too: what Triton's tools read), ModelInfer and
repository RPCs. The others (streaming, shared memory, statistics, trace and log settings) answer
``UNIMPLEMENTED``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from studio_plugins import (
    BadRequest,
    ModelState,
    RequestTimeout,
    ServingContext,
    StudioError,
    failed_headers,
)

from ..v2 import REPOSITORY_STATES, VERSION, check_inputs, check_version, fully_declared
from . import grpc_service_pb2 as pb
from . import model_config_pb2 as config_pb
from .status import status_code
from .tensors import INLINE_WORK, Inputs, decode_inputs, decode_work, encode_outputs

log = logging.getLogger("studio_plugins.grpc")

SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ("model_repository",)
MAX_DETAILS = 2048
"""Characters of an error's message sent as the status details (trailing metadata: clients
refuse metadata past 8 KiB, and the message may quote what the client sent)."""
MODEL_KEY = "grpc.model"
"""Where the scope keeps the model a call named, for the status noted at its end."""
Handler = Callable[[Any, grpc.aio.ServicerContext, dict[str, Any]], Awaitable[Any]]
CANCEL_GRACE = 0.1
"""Seconds a call whose message never came waits for grpc's word that it was cancelled."""


class LateReply(StudioError):
    """The client's own deadline passed before the model answered."""

    status = 504


def use_model(context: ServingContext, scope: dict[str, Any], name: str, rows: int | None = None) -> None:
    """Tell the metrics which model (and batch size) the call used."""
    scope[MODEL_KEY] = name
    context.record(scope, name, rows)


def config_type(datatype: str) -> int:
    """A V2 datatype as model_config.proto's ``DataType`` (BYTES is its TYPE_STRING)."""
    return int(config_pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


class InferenceService:
    """The RPCs. Each takes the request message, the call and the scope ``record`` takes."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context
        self.names = frozenset(context.model_names())  # a server's set of models is fixed

    # --- health and metadata -------------------------------------------------------------

    async def server_live(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        return pb.ServerReadyResponse(ready=self.context.ready())

    async def server_metadata(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        context = self.context
        return pb.ServerMetadataResponse(name=context.server_name, version=context.version,
                                         extensions=list(EXTENSIONS))

    def _state(self, name: str, version: str, scope: dict[str, Any]) -> ModelState:
        state = self.context.state(name)  # NotFound for a name the server does not have
        use_model(self.context, scope, name)
        check_version(name, version or None)  # "": the client did not say (tritonclient's default)
        return state

    async def model_ready(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        state = self._state(request.name, request.version, scope)
        return pb.ModelReadyResponse(ready=state.ready)

    async def model_metadata(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        state = self._state(request.name, request.version, scope)
        model = state.model
        response = pb.ModelMetadataResponse(name=state.name, versions=[VERSION],
                                            platform=model.platform if model is not None else "")
        if model is not None:
            # where the model does not say them all, none is listed (as over HTTP, where the
            # parameters say so: this message has none)
            for specs, tensors in ((model.inputs, response.inputs), (model.outputs, response.outputs)):
                if fully_declared(specs):
                    for spec in specs:
                        tensors.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return response

    async def model_config(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        """Triton's model configuration, as far as the model says it: name, platform and
        tensors, ``max_batch_size`` 0 (the shapes include the batch dim). Triton's clients and
        ``perf_analyzer`` read it to learn a model's inputs."""
        state = self._state(request.name, request.version, scope)
        model = state.model
        config = config_pb.ModelConfig(name=state.name, max_batch_size=0,
                                       platform=model.platform if model is not None else "")
        if model is not None:
            for specs, tensors in ((model.inputs, config.input), (model.outputs, config.output)):
                if fully_declared(specs):
                    for spec in specs:
                        tensors.add(name=spec.name, data_type=config_type(spec.datatype),
                                    dims=list(spec.shape))
        return pb.ModelConfigResponse(config=config)

    # --- inference -----------------------------------------------------------------------

    async def model_infer(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        context = self.context
        name = request.model_name
        if name not in self.names:
            context.state(name)  # NotFound, before decoding anything
        use_model(context, scope, name)
        check_version(name, request.model_version or None)
        heavy = decode_work(request) > INLINE_WORK  # typed numbers or many BYTES: off the loop
        if heavy:
            inputs = await asyncio.to_thread(decode_inputs, request, context.max_body)
        else:
            inputs = decode_inputs(request, context.max_body)
        check_inputs(name, context.state(name).model, inputs.values)
        result, rows = await self._infer(name, inputs, rpc.time_remaining())
        use_model(context, scope, name, rows)
        response = pb.ModelInferResponse(model_name=name, model_version=VERSION, id=request.id)
        if heavy:  # as heavy to encode, most likely (an echo, typed outputs of a typed request)
            await asyncio.to_thread(encode_outputs, response, request, inputs, result)
        else:
            encode_outputs(response, request, inputs, result)
        failed = failed_headers(getattr(result, "failed", ()))
        if failed:  # the outputs left out, and why: as the HTTP reply's headers say
            rpc.set_trailing_metadata(tuple((key.decode(), value.decode()) for key, value in failed))
        return response

    async def _infer(self, name: str, inputs: Inputs, remaining: float | None) -> Any:
        """The model's reply on the data plane, within the client's deadline if it gave one
        (``--timeout`` applies inside: whichever is smaller answers 504)."""
        if remaining is None:
            return await self.context.infer(name, inputs.values, named=True)
        if remaining <= 0:
            raise LateReply("the call's deadline passed before the model was asked")
        try:
            async with asyncio.timeout(remaining):
                return await self.context.infer(name, inputs.values, named=True)
        except TimeoutError:
            raise LateReply(f"no answer within the call's deadline ({remaining:.3g}s)") from None

    # --- the repository extension --------------------------------------------------------

    async def repository_index(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        response = pb.RepositoryIndexResponse()
        for name in self.context.model_names():
            state = self.context.state(name)
            if request.ready and not state.ready:
                continue
            response.models.add(
                name=name, version=VERSION, state=REPOSITORY_STATES.get(state.state, "UNKNOWN"),
                reason=state.error or ("unloaded" if state.state == "unloaded" else ""),
            )
        return response

    async def repository_model_load(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        """(Re)load a model, optionally from another experiment key or checkpoint: the string
        parameters ``key`` and ``checkpoint``, as over HTTP."""
        name = request.model_name
        self.context.state(name)  # NotFound for an unknown name
        use_model(self.context, scope, name)
        parameters = request.parameters
        unsupported = [p for p in parameters if p == "config" or p.startswith("file:")]
        if unsupported:
            raise BadRequest(
                f"load parameter {unsupported[0]!r} is not supported",
                hint="name an experiment or a checkpoint: the string parameters key and checkpoint",
            )
        chosen: dict[str, str | None] = {}
        for label in ("key", "checkpoint"):
            chosen[label] = None
            if label in parameters:
                parameter = parameters[label]
                if parameter.WhichOneof("parameter_choice") != "string_param":
                    raise BadRequest(f"load parameter {label!r} must be a string (string_param)")
                chosen[label] = parameter.string_param
        await self.context.load(name, chosen["key"], chosen["checkpoint"])
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any, rpc: Any, scope: dict[str, Any]) -> Any:
        name = request.model_name
        self.context.state(name)
        use_model(self.context, scope, name)
        await self.context.unload(name)
        return pb.RepositoryModelUnloadResponse()


# method -> (the service's handler, request and response types, whether the token and the
# metrics apply: not to the health checks, as over HTTP)
METHODS: dict[str, tuple[str, Any, Any, bool]] = {
    "ServerLive": ("server_live", pb.ServerLiveRequest, pb.ServerLiveResponse, False),
    "ServerReady": ("server_ready", pb.ServerReadyRequest, pb.ServerReadyResponse, False),
    "ModelReady": ("model_ready", pb.ModelReadyRequest, pb.ModelReadyResponse, True),
    "ServerMetadata": ("server_metadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse, True),
    "ModelMetadata": ("model_metadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse, True),
    "ModelConfig": ("model_config", pb.ModelConfigRequest, pb.ModelConfigResponse, True),
    "ModelInfer": ("model_infer", pb.ModelInferRequest, pb.ModelInferResponse, True),
    "RepositoryIndex": ("repository_index", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, True),
    "RepositoryModelLoad": ("repository_model_load", pb.RepositoryModelLoadRequest,
                            pb.RepositoryModelLoadResponse, True),
    "RepositoryModelUnload": ("repository_model_unload", pb.RepositoryModelUnloadRequest,
                              pb.RepositoryModelUnloadResponse, True),
}


def _parse(method: str, message_type: Any, data: bytes) -> Any:
    """The request message in ``data``, parsed by the handler once the token passed: the
    handlers take the message's bytes (no ``request_deserializer``, which grpc runs before the
    handler), so a client without the token cannot make the server parse 64 MiB of 33 million
    empty fields, a second of protobuf holding the GIL. Bytes that are no such message are a
    400, ``INVALID_ARGUMENT`` (grpc answers an exception in a deserializer ``INTERNAL``)."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"not a {method} request: {exc}") from None


def _authorization(rpc: Any) -> str | None:
    for key, value in rpc.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


async def _message(rpc: Any, read_timeout: float) -> bytes:
    """The call's request message, whole within ``read_timeout`` s (0: no limit)."""
    try:
        if read_timeout > 0:
            async with asyncio.timeout(read_timeout):  # a timer, not wait_for's task per call
                data = await rpc.read()
        else:
            data = await rpc.read()
    except TimeoutError:
        raise RequestTimeout(f"the request message did not arrive within {read_timeout:g} s "
                             "(--read-timeout)") from None
    if data is grpc.aio.EOF:
        # Also what a read gives when the call was cancelled (its client reset it, its deadline
        # passed) or refused by gRPC's core (too large, bad compression), which then answered
        # it: grpc cancels this handler a moment later. Wait for that, so such a call is counted
        # as cancelled, not answered a second time (which grpc logs as an error).
        await asyncio.sleep(CANCEL_GRACE)
        if rpc.done():
            raise asyncio.CancelledError()
        raise BadRequest("the call ended without a request message")
    return data


async def _request(rpc: Any, method: str, request_type: Any, read_timeout: float) -> Any:
    """The call's request: its message read (``_message``) and parsed (``_parse``). A type
    with no fields (ServerLive's, ServerReady's, which need no token; ServerMetadata's) is not
    read at all: no bytes could change the answer, and reading asks gRPC's core to take in a
    message of whatever length it claims (up to --max-body), which anyone could then have held
    and parsed on the event loop. Unread, the call is answered at once and what its client
    still sends is dropped (at most the stream's flow-control window)."""
    if not request_type.DESCRIPTOR.fields:
        return request_type()
    return _parse(method, request_type, await _message(rpc, read_timeout))


def _guarded(context: ServingContext, method: str, handler: Handler, request_type: Any,
             counted: bool, read_timeout: float) -> Callable[[Any, Any], Awaitable[Any]]:
    """``handler`` as a grpc method: the token, then the message read (``_message``) and parsed
    (only then), counting, and every error as a status with our message (a bug of ours:
    ``INTERNAL`` and a log line, never its traceback)."""
    route = f"/{SERVICE}/{method}"

    async def uncounted(requests: Any, rpc: Any) -> Any:
        try:
            request = await _request(rpc, method, request_type, read_timeout)
        except StudioError as exc:
            await rpc.abort(status_code(exc.status), exc.message)
        return await handler(request, rpc, {})

    async def call(requests: Any, rpc: Any) -> Any:
        if not context.authorized(_authorization(rpc)):
            await rpc.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong bearer token (metadata authorization: Bearer <token>)")
        with context.counted(route) as scope:
            try:
                request = await _request(rpc, method, request_type, read_timeout)
                reply = await handler(request, rpc, scope)
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                _note(context, scope, 499)
                raise
            except StudioError as exc:
                error: StudioError = exc
            except Exception as exc:  # a bug of ours: logged, never shown
                log.exception("internal error in %s", route)
                error = StudioError(f"internal error: {type(exc).__name__}")
            else:
                _note(context, scope, 200)
                return reply
            _note(context, scope, error.status)
            if error.status >= 500 and not isinstance(error, LateReply):
                log.warning("%s -> %d: %s", route, error.status, error)
            message = error.message + (f" ({error.hint})" if error.hint else "")
            if len(message) > MAX_DETAILS:  # it may quote the client (a megabyte model name)
                message = message[:MAX_DETAILS - 3] + "..."
            await rpc.abort(status_code(error.status), message)

    return call if counted else uncounted


def _note(context: ServingContext, scope: dict[str, Any], status: int) -> None:
    """The call's status for the metrics, with the model it named (``use_model``)."""
    context.record(scope, scope.get(MODEL_KEY, ""), status=status)


def add_service(server: Any, context: ServingContext, read_timeout: float = 0.0) -> None:
    """Register the service's handlers on ``server`` (a ``grpc.aio.Server``, not started).
    ``read_timeout``: seconds a call's request message may take to arrive (0: no limit)."""
    service = InferenceService(context)
    handlers = {
        # stream-unary: the handler reads the message itself (``_message``); on the wire a
        # unary call is the same, so unary clients call them as before
        method: grpc.stream_unary_rpc_method_handler(
            _guarded(context, method, getattr(service, attribute), request_type, counted,
                     read_timeout),
            response_serializer=response_type.SerializeToString,
        )
        for method, (attribute, request_type, response_type, counted) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # looked up without the generic path
