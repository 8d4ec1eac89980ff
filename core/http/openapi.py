"""The server's OpenAPI 3.1 document (``GET /openapi.json``), built from what it serves.

Nothing here is a hand-written list of routes: the paths are the inference routes of the hot path
(``INFERENCE_ROUTES``) and every Starlette route the app holds, route plugins' (V2) among them;
the body formats are the registered codecs; the models and their inputs are the repository's at
the time of the request (``--watch`` and V2 load/unload change them, so the document is built per
request: the routes are fixed, only the models part changes). A route this module knows nothing
of is still listed, described by its endpoint's docstring: the first line is the summary, the
rest of the first paragraph the description; a ``{name}`` path parameter is a model name.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from starlette.convertors import FloatConvertor, IntegerConvertor
from starlette.routing import BaseRoute, Mount, Route

from core.http.codecs import CodecSet
from core.http.inference import INFERENCE_ROUTES
from core.types import Codec, ModelState, TensorSpec

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
HTML = "text/html"
HIDDEN_METHODS = frozenset({"HEAD"})
"""Starlette adds HEAD to every GET route; documenting it twice says nothing new."""

ERROR_STATUSES = {
    "400": "bad input: the body or a value in it is not what the model takes",
    "404": "no such model (or route)",
    "413": "the body (or what it decodes to) is larger than --max-body",
    "415": "a Content-Type the server does not speak",
    "500": "the model failed (its message; no traceback)",
    "503": "the model is not ready, or the server is overloaded (Retry-After)",
    "504": "no answer within --timeout",
}
_DATATYPE_JSON = {"BOOL": "boolean", "FP16": "number", "FP32": "number", "FP64": "number",
                  "BF16": "number"}
_COMPONENT_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json({"$ref": "#/components/schemas/Error"})}


# The routes core/http/app.py serves itself, keyed by path: what their replies are.
_CORE_ROUTES: dict[str, dict[str, Any]] = {
    "/v2/health/live": {
        "summary": "Liveness: the process answers",
        "public": True,
        "responses": {"200": {"description": "alive", "content": _json(
            {"type": "object", "properties": {"live": {"const": True}}})}},
    },
    "/v2/health/ready": {
        "summary": "Readiness: some model is ready and the server is not draining",
        "public": True,
        "responses": {
            "200": {"description": "ready", "content": _json(
                {"type": "object", "properties": {"ready": {"type": "boolean"}}})},
            "503": {"description": "not ready (starting, every model failed or unloaded, or "
                    "shutting down)"},
        },
    },
    "/metrics": {
        "summary": "Prometheus metrics (requests, latency, queue depth, batch sizes, models)",
        "responses": {"200": {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    },
    "/openapi.json": {
        "summary": "This document: the routes, body formats and models of this server",
        "responses": {"200": {"description": "an OpenAPI 3.1 document",
                              "content": _json({"type": "object"})}},
    },
    "/docs": {
        "summary": "A page that renders this document (needs no internet access)",
        "public": True,
        "responses": {"200": {"description": "HTML (it holds no data of the server: it fetches "
                              "/openapi.json, with the token when the server has one)",
                              "content": {HTML: {"schema": {"type": "string"}}}}},
    },
    "/": {
        "summary": "For a browser: the served models, their inputs and a curl line for each",
        "description": "Answered with HTML when the request's Accept prefers text/html (as "
        "browsers send); any other GET / is a 405 (inference takes POST).",
        "responses": {
            "200": {"description": "HTML", "content": {HTML: {"schema": {"type": "string"}}}},
            "405": _error_response("the request did not ask for HTML: use POST to run the model"),
        },
    },
}


def docstring_parts(endpoint: Any) -> tuple[str, str]:
    """(summary, description) from an endpoint's docstring: its first line, and the rest of its
    first paragraph (RST double backquotes dropped). Empty strings when it has none."""
    # an ASGI class instance: its class says what it does
    target = endpoint if inspect.isroutine(endpoint) else type(endpoint)
    if getattr(target, "__module__", None) in ("builtins", "functools"):
        return "", ""  # a partial's or a builtin's docstring is about itself, not the route
    doc = inspect.getdoc(target) or ""
    paragraph = doc.replace("``", "").split("\n\n", 1)[0].strip()
    first, _, rest = paragraph.partition("\n")
    return first.strip().removesuffix("."), " ".join(rest.split())


def codec_description(codec: Codec) -> str:
    """What a codec's bodies are: its class's docstring, else the first sentence of its module's."""
    own = type(codec).__dict__.get("__doc__")
    module = sys.modules.get(type(codec).__module__)
    text = own or (module.__doc__ if module is not None else None) or codec.name
    first = " ".join(text.replace("``", "").split("\n\n", 1)[0].split())
    sentence = re.match(r"(.+?\.)(\s|$)", first)
    return sentence.group(1) if sentence else first


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join("N" if size < 0 else str(size) for size in shape) + ")"


def declared(spec: TensorSpec) -> bool:
    """Whether the model said what the input is (TorchScript names its inputs, and no more)."""
    return spec.datatype != "UNKNOWN"


def tensor_schema(spec: TensorSpec) -> dict[str, Any]:
    """The JSON a tensor takes: nested lists, one level per axis, of numbers (booleans for BOOL)."""
    if not declared(spec):
        return {"description": "datatype and shape not declared by the model"}
    leaf = _DATATYPE_JSON.get(spec.datatype, "integer" if "INT" in spec.datatype else "number")
    schema: dict[str, Any] = {"type": leaf}
    for size in reversed(spec.shape):
        schema = {"type": "array", "items": schema}
        if size >= 0:
            schema["minItems"] = schema["maxItems"] = size
    schema["description"] = f"{spec.datatype} {_shape_text(spec.shape)} (N: any size)"
    return schema


def request_schema(model: ModelState) -> dict[str, Any]:
    """A model's JSON request, after core/signature rules: a model with several named inputs takes
    exactly those keys; one with a single input takes any keys, each a batch for it."""
    served = model.model
    inputs = served.inputs if served is not None else ()
    schema: dict[str, Any] = {"type": "object", "title": f"a request for model {model.name}"}
    if not inputs:
        schema["description"] = "named values (the model declares no inputs)"
        schema["additionalProperties"] = True
        return schema
    schema["properties"] = {spec.name: tensor_schema(spec) for spec in inputs}
    if len(inputs) == 1:
        schema["description"] = (f"{inputs[0].name!r}, or any names: each key is a batch for the "
                                 "model's one input, answered under the same key")
        schema["additionalProperties"] = tensor_schema(inputs[0])
    else:
        schema["required"] = [spec.name for spec in inputs]
        schema["additionalProperties"] = False
    return schema


def component_name(model: str) -> str:
    return "model." + _COMPONENT_NAME.sub("_", model)


def describe_model(state: ModelState, default: bool) -> dict[str, Any]:
    """A served model as the docs page and the index page show it (``x-studio-models``)."""
    served = state.model
    entry: dict[str, Any] = {"name": state.name, "experiment": state.key, "state": state.state,
                             "default": default}
    if served is not None:
        entry["loader"] = served.platform
        entry["checkpoint"] = served.checkpoint.name if served.checkpoint is not None else None
        for label, specs in (("inputs", served.inputs), ("outputs", served.outputs)):
            # a tensor whose datatype the model does not declare has only its name: "UNKNOWN"
            # is no datatype a client could send
            entry[label] = [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                            if declared(s) else {"name": s.name} for s in specs]
    return entry


class DocumentBuilder:
    """Builds the document for one app: its routes and codecs are fixed, the models are read
    from ``models()`` each time."""

    def __init__(
        self, routes: Callable[[], Iterable[BaseRoute]], codecs: CodecSet,
        models: Callable[[], Sequence[ModelState]], *, title: str, version: str,
        token: bool = False,
    ) -> None:
        self.routes = routes
        self.codecs = codecs
        self.models = models
        self.title = title
        self.version = version
        self.token = token

    def document(self) -> dict[str, Any]:
        models = list(self.models())
        names = [model.name for model in models]
        paths: dict[str, dict[str, Any]] = {}
        ids: set[str] = set()

        def add(path: str, method: str, operation: dict[str, Any]) -> None:
            operation["operationId"] = _operation_id(method, path, ids)
            paths.setdefault(path, {})[method.lower()] = operation

        for path, method in INFERENCE_ROUTES:
            add(path, method, self._inference(path, models))
        for path, method, route in starlette_operations(self.routes()):
            if (path, method) not in INFERENCE_ROUTES:  # described above, with the models' schemas
                add(path, method, self._operation(path, method, route, names))
        schemas: dict[str, Any] = {
            "Error": {"type": "object", "required": ["error", "type"], "properties": {
                "error": {"type": "string", "description": "what went wrong"},
                "type": {"type": "string", "description": "the kind of error, e.g. BadRequest"},
                "hint": {"type": "string", "description": "what to do about it"},
            }},
            "Reply": {"type": "object", "additionalProperties": True,
                      "description": "each key's result under that key (a model with several "
                      "inputs or outputs: its named outputs)"},
        }
        for model in models:
            schemas[component_name(model.name)] = request_schema(model)
        document: dict[str, Any] = {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": self.title,
                "version": self.version,
                "description": "Serves trained models: POST a dict of named arrays, get each "
                "key's result back under that key. Bodies: " + ", ".join(
                    f"{codec.media_type} ({codec.name})" for codec in self.codecs.codecs) + ".",
            },
            "paths": paths,
            "components": {"schemas": schemas},
            "x-studio-models": [describe_model(model, i == 0) for i, model in enumerate(models)],
        }
        if self.token:
            document["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the server's --token (STUDIO_TOKEN)"}}
            document["security"] = [{"bearer": []}]
        return document

    # --- operations -------------------------------------------------------------------------

    def _inference(self, path: str, models: Sequence[ModelState]) -> dict[str, Any]:
        by_name = path != "/"
        targets = models if by_name else models[:1]
        refs = [{"$ref": f"#/components/schemas/{component_name(m.name)}"} for m in targets]
        json_schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
        content: dict[str, Any] = {}
        for codec in self.codecs.codecs:
            for media_type in codec.media_types:
                if media_type == JSON:
                    content[media_type] = {"schema": json_schema}
                else:
                    content[media_type] = {"schema": {
                        "type": "string", "format": "binary", "description": codec_description(codec)}}
        reply_content = {media_type: {"schema": {"$ref": "#/components/schemas/Reply"}}
                         if media_type == JSON else body for media_type, body in content.items()}
        operation: dict[str, Any] = {
            "summary": (f"Run model {models[0].name!r} (the default)" if not by_name
                        else "Run the named model"),
            "description": "The body is a dict of named arrays in any of the formats below; the "
            "format comes from Content-Type (with none, from the body's first bytes). The reply "
            "is in the request's format unless Accept names another.",
            "requestBody": {"required": True, "content": content},
            "responses": {
                "200": {"description": "the model's results", "content": reply_content},
                **{status: _error_response(text) for status, text in ERROR_STATUSES.items()},
            },
        }
        if by_name:
            operation["parameters"] = [_model_parameter([m.name for m in models])]
        self._secure(operation, public=False)
        return operation

    def _operation(self, path: str, method: str, route: Route, models: list[str]) -> dict[str, Any]:
        known = _CORE_ROUTES.get(path) if method == "GET" else None
        operation: dict[str, Any]
        if known is not None:
            operation = {k: v for k, v in known.items() if k != "public"}
            operation["responses"] = {**operation["responses"],
                                      "default": _error_response("an error")}
        else:
            summary, description = docstring_parts(route.endpoint)
            operation = {"summary": summary or f"{method} {path}"}
            if description:
                operation["description"] = description
            if method in ("POST", "PUT", "PATCH"):
                operation["requestBody"] = {"content": _json({"type": "object"})}
            operation["responses"] = {"200": {"description": "success", "content": _json({})},
                                      "default": _error_response("an error")}
        parameters = [_model_parameter(models) if name == "name" else _path_parameter(name, route)
                      for name in re.findall(r"{([^}:]+)}", path)]
        if parameters:
            operation["parameters"] = parameters
        self._secure(operation, public=bool(known and known.get("public")))
        return operation

    def _secure(self, operation: dict[str, Any], public: bool) -> None:
        if not self.token:
            return
        if public:
            operation["security"] = []  # answered without the token
        else:
            operation["responses"]["401"] = _error_response("no or a wrong bearer token")


def starlette_operations(routes: Iterable[BaseRoute], prefix: str = "") -> list[tuple[str, str, Route]]:
    """(path, METHOD, route) for every HTTP route, mounts followed; ``include_in_schema=False``
    leaves a route out, as in Starlette's own schema generator."""
    found: list[tuple[str, str, Route]] = []
    for route in routes:
        if isinstance(route, Mount):
            found += starlette_operations(route.routes or (), prefix + route.path_format)
        elif isinstance(route, Route) and route.include_in_schema:
            for method in sorted((route.methods or {"GET"}) - HIDDEN_METHODS):
                found.append((prefix + route.path_format, method, route))
    return found


def _path_parameter(name: str, route: Route) -> dict[str, Any]:
    convertor = route.param_convertors.get(name)
    kind = {IntegerConvertor: "integer", FloatConvertor: "number"}.get(type(convertor), "string")
    return {"name": name, "in": "path", "required": True, "schema": {"type": kind}}


def _model_parameter(models: list[str]) -> dict[str, Any]:
    return {"name": "name", "in": "path", "required": True, "description": "a model this server serves",
            "schema": {"type": "string", "enum": models}}


def _operation_id(method: str, path: str, taken: set[str]) -> str:
    base = method.lower() + "_" + (re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root")
    candidate, count = base, 1
    while candidate in taken:
        count += 1
        candidate = f"{base}_{count}"
    taken.add(candidate)
    return candidate
