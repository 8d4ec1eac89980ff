"""The models a server holds, each in a slot that can be swapped atomically: several models,
parallel loading, live checkpoint reload (``--watch``) and the V2 repository operations.

A request reads ``slot.model`` once when it starts, so swapping the attribute is atomic: requests
in flight finish on the old model, new ones get the new one, and none waits for a load. Loads
run in threads (never on the event loop), one at a time per slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from core.errors import ExperimentError, LoadError, NotFound, StudioError
from core.host import PluginHost
from core.models.assembly import load_model
from core.models.compiling import Compiler
from core.models.experiments import open_store, validate_key
from core.types import ExperimentStore, ModelSpec, ModelState, ServedModel, ServeOptions

log = logging.getLogger("studio_plugins.repository")

OnSwap = Callable[[str, ServedModel | None, float, ServedModel | None], None]
"""Called with (name, new model, load seconds, old model) after every swap; the new model is
None (and the seconds 0) when a model was unloaded."""


class ModelSlot:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: ServedModel | None = None
        self.state = "loading"
        self.error: str | None = None
        self.load_seconds = 0.0
        self.fingerprint: str | None = None
        """The store's fingerprint when the served model was loaded."""
        self.seen: str | None = None
        """The last fingerprint the watcher saw (a change must hold for two polls)."""
        self.failed: str | None = None
        """A fingerprint whose load failed: retried only once the store changes again."""
        self.lock = threading.Lock()

    def snapshot(self) -> ModelState:
        return ModelState(self.spec.name, self.spec.key, self.state, self.model, self.error)


class ModelRepository:
    def __init__(self, host: PluginHost, options: ServeOptions) -> None:
        self.host = host
        self.options = options
        specs = options.model_specs()
        names = [spec.name for spec in specs]
        for spec in specs:
            validate_key(spec.key)
            validate_key(spec.name)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise LoadError(
                f"model name {duplicates[0]!r} is given twice",
                hint="name each model once: --model NAME=KEY",
            )
        self.slots: dict[str, ModelSlot] = {spec.name: ModelSlot(spec) for spec in specs}
        self.on_swap: list[OnSwap] = []
        self._store: ExperimentStore | None = None
        self.compiler: Compiler | None = Compiler(self._swap_compiled) if options.compile else None
        """Compiles each model once it is loaded (``--no-compile``: None); the process says when
        (core/models/compiling.py)."""

    @property
    def store(self) -> ExperimentStore:
        if self._store is None:
            self._store = open_store(self.host, self.options.store_url)
        return self._store

    # --- queries --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.slots)

    def slot(self, name: str) -> ModelSlot:
        try:
            return self.slots[name]
        except KeyError:
            raise NotFound(f"no model named {name!r}") from None

    def state(self, name: str) -> ModelState:
        return self.slot(name).snapshot()

    def any_ready(self) -> bool:
        return any(slot.model is not None for slot in self.slots.values())

    # --- loading ----------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every model, in parallel threads. A failure fails the start with one line naming
        the model, unless ``allow_partial`` (then that model is not ready; the others serve)."""
        self.store  # noqa: B018 - open it once, before the threads, so a bad URL fails once
        with ThreadPoolExecutor(max(1, len(self.slots)), thread_name_prefix="studio-load") as pool:
            outcomes = list(pool.map(self._first_load, self.slots.values()))
        failures = [(name, exc) for name, exc in zip(self.slots, outcomes, strict=True) if exc]
        if not failures:
            return
        if not self.options.allow_partial or len(failures) == len(self.slots):
            name, exc = failures[0]
            if len(self.slots) == 1:
                raise exc
            message = exc.message if isinstance(exc, StudioError) else str(exc)
            hint = exc.hint if isinstance(exc, StudioError) else None
            if not self.options.allow_partial:
                hint = (hint + "; " if hint else "") + "--allow-partial serves the others"
            key = self.slots[name].spec.key
            raise LoadError(f"model {name!r} (experiment {key}): {message}", hint=hint) from exc
        for name, exc in failures:
            log.error("model %s failed to load and is not ready: %s", name, exc)

    def _first_load(self, slot: ModelSlot) -> BaseException | None:
        try:
            self._load_into(slot, slot.spec)
        except Exception as exc:
            return exc
        return None

    def _load_into(self, slot: ModelSlot, spec: ModelSpec) -> ModelState:
        with slot.lock:
            try:
                fingerprint = self.store.fingerprint(spec.key)
            except Exception as exc:  # the watcher retries; a first load fails below anyway
                log.debug("fingerprint of %s failed: %s", spec.key, exc)
                fingerprint = None
            previous = slot.model
            if previous is None:
                slot.state = "loading"
            started = time.perf_counter()
            try:
                model = load_model(self.host, self.options, spec.key, spec=spec)
            except Exception as exc:
                slot.error = exc.message if isinstance(exc, StudioError) else str(exc)
                if previous is None:
                    slot.state = "failed"
                raise
            seconds = time.perf_counter() - started
            slot.spec = spec
            slot.model = model  # the swap: one assignment, atomic for every reader
            slot.state, slot.error = "ready", None
            slot.fingerprint = slot.seen = fingerprint
            slot.failed = None
            slot.load_seconds = seconds
        for callback in self.on_swap:
            callback(spec.name, model, seconds, previous)
        if self.compiler is not None:
            self.compiler.submit(spec.name, model)
        return slot.snapshot()

    def _swap_compiled(self, name: str, eager: ServedModel, compiled: ServedModel) -> bool:
        """Swap a model's compiled version in, as a reload would, if ``eager`` still serves."""
        slot = self.slot(name)
        with slot.lock:
            if slot.model is not eager:
                return False
            slot.model = compiled  # the swap: one assignment, atomic for every reader
            seconds = slot.load_seconds
        for callback in self.on_swap:
            callback(name, compiled, seconds, eager)
        return True

    def load(self, name: str, key: str | None = None, checkpoint: str | None = None) -> ModelState:
        """(Re)load ``name`` now — from another experiment or checkpoint if given. On failure
        the old model (if any) keeps serving and the error is raised."""
        slot = self.slot(name)
        spec = slot.spec
        if key is not None:
            spec = replace(spec, key=validate_key(key), checkpoint=checkpoint)
        elif checkpoint is not None:
            spec = replace(spec, checkpoint=checkpoint)
        return self._load_into(slot, spec)

    def unload(self, name: str) -> ModelState:
        slot = self.slot(name)
        with slot.lock:
            previous = slot.model
            slot.model = None
            slot.state, slot.error = "unloaded", None
        log.info("model %s unloaded", name)
        if previous is not None:  # listeners let go of it too (batchers, the frozen heap)
            for callback in self.on_swap:
                callback(name, None, 0.0, previous)
        return slot.snapshot()

    # --- watching ---------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """One look at the store for every served model; reloads those whose modeldir changed
        and then held still for a poll (a file still being written waits). Returns the names
        reloaded. Cheap: stores answer ``fingerprint`` from mtimes or ETags, no download."""
        reloaded = []
        for name, slot in self.slots.items():
            if slot.state != "ready":
                continue
            try:
                fingerprint = self.store.fingerprint(slot.spec.key)
            except (StudioError, OSError) as exc:
                log.warning("cannot check %s for a new checkpoint: %s", slot.spec.key, exc)
                continue
            if fingerprint == slot.fingerprint or fingerprint == slot.failed:
                slot.seen = fingerprint
                continue
            if fingerprint != slot.seen:
                slot.seen = fingerprint  # changed: load once it holds still until the next poll
                continue
            log.info("model %s: experiment %s changed; loading it", name, slot.spec.key)
            try:
                self._load_into(slot, slot.spec)
            except Exception as exc:
                slot.failed = fingerprint
                log.error("model %s: the new checkpoint failed to load (%s); the previous one "
                          "keeps serving", name, exc)
                continue
            reloaded.append(name)
            log.info("model %s now serves %s", name, _describe(slot.model))
        return reloaded

    async def watch(self, interval: float) -> None:
        """Poll every ``interval`` seconds until cancelled; the polls run in a thread."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.poll)
            except ExperimentError as exc:
                log.warning("--watch: %s", exc)


def _describe(model: ServedModel | None) -> str:
    if model is None:
        return "nothing"
    return f"{model.checkpoint.name if model.checkpoint else 'no file'} ({model.platform})"
