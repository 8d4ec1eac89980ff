"""The built app in process for the web tests (OpenAPI, pages, CORS): one request through ASGI,
and a server whose models declare their inputs, loaded from ``*.toy`` checkpoints by a throwaway
loader (a real Loader through the real host; the model is a real signature.TensorModel, so a
request of the wrong shape is refused as a Keras or torch model's would be)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from core.types import ServeOptions
from plugins.loaders.signature import Expected, TensorModel, numpy_dtype
from studio_plugins import Loader, LoadOptions, ServedModel, hookimpl
from studio_plugins.testing import make_host
from tests.asgi import Reply, call

__all__ = ["BROWSER_ACCEPT", "Reply", "ToyLoader", "call", "toy_app"]


class ToyLoader(Loader):
    """``*.toy``: a JSON file ``{"input": ["FP32", [-1, 3]], ...}`` (``null``: the input's datatype
    and shape not declared, as TorchScript's are not); the model adds its inputs."""

    name = "toy"
    patterns = ("*.toy",)

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        assert checkpoint is not None
        declared = json.loads(checkpoint.read_text())
        inputs = [Expected(name, numpy_dtype(spec[0]), tuple(spec[1])) if spec else Expected(name)
                  for name, spec in declared.items()]

        def run(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"sum": sum(array.astype(np.float64) for array in named.values())}  # type: ignore[dict-item]

        return ServedModel(TensorModel(run, inputs), "toy", checkpoint,
                           inputs=tuple(e.spec for e in inputs))


class ToyPlugin:
    @staticmethod
    @hookimpl
    def studio_register_loaders(register: Any) -> None:
        register(ToyLoader())


def toy_app(home: Path, models: dict[str, tuple[str, dict[str, Any]] | None], *,
            routes: bool = True, plugins: tuple[object, ...] = (), serve: dict[str, Any] | None = None,
            **settings: Any) -> Any:
    """The app serving ``models`` (key -> (checkpoint file name, declared inputs), or None for an
    empty modeldir: the identity model, or the ``--wrapper`` in ``serve``) from the store at
    ``home``; ``serve``: more ServeOptions; ``settings``: AppSettings; ``plugins``: more,
    registered after the toy loader."""
    for key, model in models.items():
        modeldir = home / "experiments" / key / "modeldir"
        modeldir.mkdir(parents=True)
        if model is not None:
            (modeldir / model[0]).write_text(json.dumps(model[1]))
    host = make_host(ToyPlugin(), *plugins)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STUDIOML_HOME", str(home))
        for variable in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
            patch.delenv(variable, raising=False)
        repository = ModelRepository(host, ServeOptions(keys=tuple(models), **(serve or {})))
        repository.load_all()
    app = build_app(repository, AppSettings(codecs=CodecSet(host.codecs()), **settings),
                    host.route_factories() if routes else ())
    app.repository = repository  # type: ignore[attr-defined]  # for tests that unload a model
    return app


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
"""What Chromium sends when it opens a page."""
