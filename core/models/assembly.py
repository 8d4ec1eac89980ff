"""Assembly: experiment key -> modeldir -> the model to serve (wrapper, newest checkpoint, identity).

Identity only for a modeldir with nothing in it (or ``--loader identity``): one with files of
which no loader can serve any is an error that names them.

Runs once at ``serve``, before the port is bound; every failure is a ``StudioError`` with a hint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigurationError, ExperimentError, LoadError, StudioError
from core.host import PluginHost
from core.models.experiments import find_modeldir, open_store, validate_key
from core.models.wrappers import load_wrapper
from core.types import Loader, LoadOptions, ModelSpec, ServedModel, ServeOptions

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


@dataclass(frozen=True)
class Entry:
    """A file (or folder) of a modeldir, as ``serve`` sees it."""

    path: Path
    loader: str | None
    """The loader that recognises it; None: none does."""
    kind: str | None
    """What it is when no loader serves it (a loader's ``describe``, or ``unrecognised``)."""
    size: int
    mtime: float
    served: bool = False
    """The checkpoint ``serve`` loads: the newest a loader recognises."""


def survey(modeldir: Path, loaders: dict[str, Loader]) -> list[Entry]:
    """Every entry of ``modeldir`` but hidden ones, newest first, each with the loader that
    recognises it or what it is; the one ``serve`` would load is marked (``find_checkpoints``
    decides, so this never disagrees with it)."""
    if not modeldir.is_dir():
        return []
    candidates = {c.path: c for c in find_checkpoints(modeldir, loaders)}
    newest = next(iter(candidates), None)
    entries = []
    for path in modeldir.iterdir():
        if path.name.startswith("."):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed while we looked
            continue
        candidate = candidates.get(path)
        entries.append(Entry(
            path,
            candidate.loader.name if candidate else None,
            None if candidate else _kind(path, loaders),
            stat.st_size if path.is_file() else 0,
            stat.st_mtime,
            served=path == newest,
        ))
    entries.sort(key=lambda e: (-e.mtime, e.path.name))
    return entries


def _kind(path: Path, loaders: dict[str, Loader]) -> str:
    if path.is_dir():
        return "a folder"
    for loader in loaders.values():
        kind = loader.describe(path)
        if kind:
            return kind
    return "unrecognised"


WRAPPER_NEEDED = "serve it with --wrapper FILE whose create_model(modeldir) builds the model"
WRAPPER_HINT = ("a whole saved model needs no wrapper (Keras model.save, torch.jit.save or "
                "torch.export.save); --loader identity serves the echo model instead")


def _found(entries: list[Entry], most: int = 8) -> str:
    named = ", ".join(f"{e.path.name} ({e.kind})" for e in entries[:most])
    return named + (f" and {len(entries) - most} more" if len(entries) > most else "")


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
        kind = _kind(path, loaders)
        if kind != "unrecognised":
            raise LoadError(f"{path.name} is {kind}; {WRAPPER_NEEDED}", hint=WRAPPER_HINT)
        raise LoadError(
            f"no loader recognises {path.name}", hint="pass --loader NAME to choose one"
        )
    if loader_name:
        loader = _pick_loader(loaders, loader_name)
        if not loader.patterns:
            return loader, None
        candidates = find_checkpoints(modeldir, {loader_name: loader})
        if not candidates:
            own = [e for e in survey(modeldir, {loader_name: loader}) if e.kind != "unrecognised"]
            if own:
                raise LoadError(f"no checkpoint for loader {loader_name!r} in {modeldir}: it "
                                f"holds {_found(own)}; {WRAPPER_NEEDED}", hint=WRAPPER_HINT)
            raise ExperimentError(f"no checkpoint for loader {loader_name!r} in {modeldir}")
        return loader, candidates[0].path
    candidates = find_checkpoints(modeldir, loaders)
    if candidates:
        return candidates[0].loader, candidates[0].path
    # Files but no model: the identity model would answer every request with its input, a 200
    # that hides the mistake (weights saved without the model, most often)
    entries = survey(modeldir, loaders)
    if entries:
        raise LoadError(f"no model to serve in {modeldir}: it holds {_found(entries)}; "
                        f"{WRAPPER_NEEDED}", hint=WRAPPER_HINT)
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
