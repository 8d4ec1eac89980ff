"""``--wrapper``: a registered wrapper name, a Python file, or an importable module name.

A file is loaded by path under a unique module name; its folder is never put on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from core.errors import LoadError
from core.host import PluginHost
from core.types import CreateModel, ServedModel


def _module_from_file(path: Path) -> ModuleType:
    # Unique per path, and a valid identifier whatever the file is called.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"studio_wrapper_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot load wrapper file {path}", hint="a wrapper is a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise LoadError(f"wrapper {path} failed to import: {type(exc).__name__}: {exc}",
                        hint=_missing_module_hint(exc)) from exc
    return module


def _missing_module_hint(exc: Exception) -> str | None:
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    if top == "tensorflow":  # Keras 3 imports it when KERAS_BACKEND says so, or nothing set it
        return ("Keras 3 uses TensorFlow unless KERAS_BACKEND says otherwise; the server runs it "
                "on torch (KERAS_BACKEND=torch): unset KERAS_BACKEND or set it to torch")
    return f"the wrapper imports {top}, which is not installed in this environment"


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve_wrapper(host: PluginHost, spec: str) -> CreateModel:
    """The ``create_model`` that ``--wrapper spec`` names."""
    registered = host.wrappers()
    if spec in registered:
        return registered[spec]
    if _looks_like_path(spec) or Path(spec).is_file():
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            what = "is a directory, not a .py file" if path.is_dir() else "does not exist"
            raise LoadError(f"wrapper file {spec} {what}", hint="--wrapper takes a .py file, a "
                            "module name or a registered wrapper name")
        module = _module_from_file(path)
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (spec == exc.name or spec.startswith(exc.name + ".")):
                # The module exists; something it imports does not.
                raise LoadError(f"wrapper module {spec} failed to import: {exc}") from exc
            names = ", ".join(sorted(registered)) or "none"
            raise LoadError(
                f"wrapper {spec!r} is neither a file, an importable module nor a registered wrapper",
                hint=f"registered wrappers: {names}; a module must be importable (PYTHONPATH)",
            ) from exc
        except Exception as exc:
            raise LoadError(
                f"wrapper module {spec} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
    create_model = getattr(module, "create_model", None)
    if not callable(create_model):
        raise LoadError(
            f"wrapper {spec} has no create_model function",
            hint="define create_model(modeldir) returning a dict -> dict callable",
        )
    return create_model


def load_wrapper(host: PluginHost, spec: str, modeldir: Path) -> ServedModel:
    create_model = resolve_wrapper(host, spec)
    try:
        model = create_model(str(modeldir))
    except Exception as exc:
        raise LoadError(f"wrapper {spec}: create_model raised {type(exc).__name__}: {exc}") from exc
    if not callable(model):
        raise LoadError(
            f"wrapper {spec}: create_model returned {type(model).__name__}, not a callable",
            hint="return a function (or ModelPipe) taking and returning a dict",
        )
    # Batching is on by default, so a wrapper is batched only when it says its rows are
    # independent: stacking other clients' rows into a call of a model that mixes them (a
    # normalisation over the batch, a reply with other rows than it was given, per-request
    # state) would change answers, or show one client another's data, silently.
    return ServedModel(
        predict=model,
        platform="wrapper",
        batchable=bool(getattr(model, "batchable", False)),
    )
