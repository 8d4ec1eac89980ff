"""Assembly: experiment key -> modeldir -> the model to serve (wrapper, newest checkpoint, identity).

Runs once at ``serve``, before the port is bound; every failure is a ``StudioError`` with a hint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigurationError, ExperimentError, LoadError, StudioError
from core.experiments import find_modeldir, open_store, validate_key
from core.host import PluginHost
from core.types import Loader, LoadOptions, ModelSpec, ServedModel, ServeOptions
from core.wrappers import load_wrapper

log = logging.getLogger("studio_plugins.assembly")

IDENTITY = "identity"


@dataclass(frozen=True)
class Candidate:
    """A checkpoint file a loader recognised."""

    path: Path
    loader: Loader
    mtime: float


def find_checkpoints(modeldir: Path, loaders: dict[str, Loader]) -> list[Candidate]:
    """Every file in ``modeldir`` some loader recognises, newest first (ties: name)."""
    candidates: list[Candidate] = []
    if not modeldir.is_dir():
        return candidates
    for path in sorted(modeldir.iterdir()):
        if not path.is_file():
            continue
        for loader in loaders.values():
            if loader.patterns and loader.recognises(path):
                candidates.append(Candidate(path, loader, path.stat().st_mtime))
                break
    candidates.sort(key=lambda c: (-c.mtime, c.path.name))
    return candidates


def _pick_loader(loaders: dict[str, Loader], name: str) -> Loader:
    if name not in loaders:
        known = ", ".join(sorted(loaders)) or "none"
        raise ConfigurationError(f"no loader named {name!r}", hint=f"loaders installed: {known}")
    return loaders[name]


def choose(
    modeldir: Path, loaders: dict[str, Loader], checkpoint: str | None, loader_name: str | None
) -> tuple[Loader, Path | None]:
    """Which loader loads which file (``None``: the identity model, no file)."""
    if checkpoint:
        path = (modeldir / checkpoint).resolve()
        if modeldir.resolve() not in path.parents or not path.is_file():
            raise ExperimentError(
                f"checkpoint {checkpoint!r} is not a file in {modeldir}",
                hint="name a file of the modeldir (see `studio-plug experiments ls`)",
            )
        if loader_name:
            return _pick_loader(loaders, loader_name), path
        for loader in loaders.values():
            if loader.patterns and loader.recognises(path):
                return loader, path
        raise LoadError(
            f"no loader recognises {path.name}", hint="pass --loader NAME to choose one"
        )
    if loader_name:
        loader = _pick_loader(loaders, loader_name)
        if not loader.patterns:
            return loader, None
        candidates = find_checkpoints(modeldir, {loader_name: loader})
        if not candidates:
            raise ExperimentError(f"no checkpoint for loader {loader_name!r} in {modeldir}")
        return loader, candidates[0].path
    candidates = find_checkpoints(modeldir, loaders)
    if candidates:
        return candidates[0].loader, candidates[0].path
    seen = sorted(p.name for p in modeldir.iterdir()) if modeldir.is_dir() else []
    if seen:
        log.warning(
            "no checkpoint recognised in %s (files seen: %s); serving the identity model",
            modeldir,
            ", ".join(seen[:20]) + (" ..." if len(seen) > 20 else ""),
        )
    else:
        log.warning("no checkpoints in %s; serving the identity model", modeldir)
    return _pick_loader(loaders, IDENTITY), None


def load_model(
    host: PluginHost, options: ServeOptions, key: str, spec: ModelSpec | None = None
) -> ServedModel:
    """Assemble the model for experiment ``key`` as ``options`` ask (``spec``, when given,
    says which checkpoint and wrapper this one model uses)."""
    validate_key(key)
    checkpoint = spec.checkpoint if spec else options.checkpoint
    wrapper = spec.wrapper if spec else options.wrapper
    # logs name the model, and its experiment when that differs
    name = key if spec is None or spec.name == key else f"{spec.name} (experiment {key})"
    store = open_store(host, options.store_url)
    modeldir = find_modeldir(store, key)
    started = time.perf_counter()
    if wrapper:
        model = load_wrapper(host, wrapper, modeldir)
        log.info("%s: wrapper %s (modeldir %s)", name, wrapper, modeldir)
    else:
        loader, path = choose(modeldir, host.loaders(), checkpoint, options.loader)
        if path is None:
            log.info("%s: no checkpoint file, with loader %s", name, loader.name)
        else:
            log.info("%s: %s with loader %s", name, path.name, loader.name)
        load_options = LoadOptions(trust_checkpoint=options.trust_checkpoint, gpus=options.gpus)
        try:
            model = loader.load(path, load_options)
        except StudioError:
            raise
        except Exception as exc:
            raise LoadError(
                f"loader {loader.name} could not load {path}: {type(exc).__name__}: {exc}"
            ) from exc
    log.info("%s ready in %.2fs", name, time.perf_counter() - started)
    return model
