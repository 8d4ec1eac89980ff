"""GET /openapi.json: a valid OpenAPI document (checked by openapi-spec-validator) of exactly the
routes the app serves, with the codecs' body formats and each model's declared inputs; built
per request, so an unloaded model shows as such (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from core.http.inference import INFERENCE_ROUTES
from core.http.openapi import component_name, docstring_parts, starlette_operations
from core.http.pages import example_body
from core.types import TensorSpec
from tests.web_app import call, toy_app

MODELS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "single": ("model.toy", {"x": ["FP32", [-1, 3]]}),
    "pair": ("pair-v2.toy", {"a": ["INT64", [-1, 2]], "flag": ["BOOL", [-1]]}),
    "plain": None,  # no checkpoint: the identity model, which declares nothing
    "named": ("script.toy", {"x": None}),  # names its input, no more (as TorchScript does)
}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return toy_app(tmp_path_factory.mktemp("studioml"), MODELS)


@pytest.fixture(scope="module")
def document(app: Any) -> dict[str, Any]:
    reply = call(app, "GET", "/openapi.json")
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


def served_operations(app: Any) -> set[tuple[str, str]]:
    """(path, method) of every route the app answers: the hot path's and Starlette's."""
    starlette_app = app.app  # inside EdgeMiddleware
    operations = {(path, method) for path, method in INFERENCE_ROUTES}
    for route in starlette_app.routes:
        assert isinstance(route, Route)  # a Mount would need walking: the generator does
        operations |= {(route.path_format, m) for m in route.methods or () if m != "HEAD"}
    return operations


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_route_served_is_documented_and_nothing_else(app: Any, document: dict[str, Any]) -> None:
    served = served_operations(app)
    assert len(served) > 15  # the V2 routes are among them
    assert documented_operations(document) == served
    assert ("/v2/models/{name}/infer", "POST") in served and ("/metrics", "GET") in served


def test_without_v2_or_metrics_those_routes_are_gone(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": None}, routes=False, metrics=False)
    document = call(app, "GET", "/openapi.json").json()
    validate(document)
    assert documented_operations(document) == served_operations(app)
    assert not any(path.startswith("/v2/models") or path == "/metrics" for path in document["paths"])
    assert "/v2/health/ready" in document["paths"]  # the core's own, always there


def test_bodies_are_the_codecs_and_json_follows_the_models_inputs(document: dict[str, Any]) -> None:
    content = document["paths"]["/"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/python-pickle", "application/x-npz"} <= set(content)
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/model.single"}
    by_name = document["paths"]["/models/{name}"]["post"]
    assert by_name["parameters"][0]["schema"]["enum"] == ["single", "pair", "plain", "named"]
    assert len(by_name["requestBody"]["content"]["application/json"]["schema"]["anyOf"]) == 4
    schemas = document["components"]["schemas"]
    single = schemas["model.single"]["properties"]["x"]
    assert single["description"] == "FP32 (N, 3) (N: any size)"
    assert single["items"] == {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
    pair = schemas["model.pair"]
    assert pair["required"] == ["a", "flag"] and pair["additionalProperties"] is False
    assert pair["properties"]["flag"]["items"] == {"type": "boolean"}
    assert pair["properties"]["a"]["items"]["items"] == {"type": "integer"}
    assert schemas["model.plain"]["additionalProperties"] is True
    assert schemas["model.named"]["properties"]["x"] == {
        "description": "datatype and shape not declared by the model"}


def test_the_models_part_names_loader_checkpoint_and_inputs(document: dict[str, Any]) -> None:
    models = {m["name"]: m for m in document["x-studio-models"]}
    assert models["single"]["default"] is True and models["pair"]["default"] is False
    assert models["pair"]["loader"] == "toy" and models["pair"]["checkpoint"] == "pair-v2.toy"
    assert models["pair"]["inputs"] == [{"name": "a", "datatype": "INT64", "shape": [-1, 2]},
                                        {"name": "flag", "datatype": "BOOL", "shape": [-1]}]
    assert models["plain"]["loader"] == "identity" and models["plain"]["checkpoint"] is None
    assert "/" not in json.dumps(document["x-studio-models"])  # file names, not server paths
    # an input named but not typed (as TorchScript's): its name only, never a made-up datatype
    assert models["named"]["inputs"] == [{"name": "x"}] and "UNKNOWN" not in json.dumps(document)


@pytest.mark.parametrize("name", ["single", "pair"])
def test_the_example_body_fits_the_schema_and_the_model_takes_it(app: Any, document: dict[str, Any],
                                                                 name: str) -> None:
    """The index page's curl body, the document's schema and the model agree with each other."""
    inputs = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"]))
              for s in next(m for m in document["x-studio-models"] if m["name"] == name)["inputs"]]
    body = example_body(inputs)
    assert body is not None
    jsonschema.Draft202012Validator(document["components"]["schemas"][component_name(name)]).validate(
        json.loads(body))
    reply = call(app, "POST", f"/models/{name}", {"Content-Type": "application/json"}, body.encode())
    assert reply.status == 200, reply.body
    # and a body the schema refuses, the model refuses too
    wrong = {spec.name: [[0.0] * 4] for spec in inputs}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(document["components"]["schemas"][component_name(name)]).validate(wrong)
    assert call(app, "POST", f"/models/{name}", {"Content-Type": "application/json"},
                json.dumps(wrong).encode()).status == 400


def test_the_document_follows_the_models_state(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": ("m.toy", {"x": ["FP32", [-1, 3]]}), "other": None})
    app.repository.unload("other")
    models = {m["name"]: m for m in call(app, "GET", "/openapi.json").json()["x-studio-models"]}
    assert models["other"]["state"] == "unloaded" and "loader" not in models["other"]
    assert models["exp"]["state"] == "ready"


def test_with_a_token_everything_but_health_and_docs_needs_it(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": None}, token="s3cret")
    assert call(app, "GET", "/openapi.json").status == 401
    document = call(app, "GET", "/openapi.json", {"Authorization": "Bearer s3cret"}).json()
    validate(document)
    assert document["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    public = {path for path, item in document["paths"].items()
              if any(op.get("security") == [] for op in item.values())}
    assert public == {"/docs", "/v2/health/live", "/v2/health/ready"}
    assert "401" in document["paths"]["/models/{name}"]["post"]["responses"]


def test_plugin_routes_are_described_by_their_docstrings() -> None:
    async def endpoint(request: Any) -> Any:
        """Say hello to a model.
        The rest of the first paragraph
        is the description.

        Not this paragraph: notes for the code's readers."""

    class Asgi:
        """Count things."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...

    assert docstring_parts(endpoint) == ("Say hello to a model",
                                         "The rest of the first paragraph is the description.")
    assert docstring_parts(Asgi()) == ("Count things", "")
    routes = [Route("/hello/{name}/{n:int}", endpoint, methods=["GET", "POST"]),
              Route("/hidden", endpoint, include_in_schema=False)]
    assert [(p, m) for p, m, _ in starlette_operations(routes)] == [
        ("/hello/{name}/{n}", "GET"), ("/hello/{name}/{n}", "POST")]
