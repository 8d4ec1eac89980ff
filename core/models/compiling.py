"""The compiled call path: a loaded model's faster version (``ServedModel.compiler``), built
after the model serves and swapped into its slot as ``--watch`` swaps in a new checkpoint.

The eager model answers from the start, so compiling never delays the first answer. A compile
that fails, or whose answers disagree with the eager model's (the loader checks that), leaves
the eager model serving, with one log line saying why. Compiles run one at a time (two models
tracing at once would compete for the same cores the requests need).

Two ways to run them, chosen by the process (core/process/launch.py):

- one process: ``start()`` once the server is serving; from then on each loaded model (the
  first load, a ``--watch`` reload, a V2 load) is compiled in a background thread;
- ``--workers``: the parent never starts the thread (a fork while another thread runs torch can
  leave the child holding a lock that no thread will release); it calls ``run_pending()`` before
  it forks the workers, and after a ``--watch`` reload before it re-forks them, so the workers
  share the compiled model. There the first answer waits for the compile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from core.types import ServedModel

log = logging.getLogger("studio_plugins.compiling")

Swap = Callable[[str, ServedModel, ServedModel], bool]
"""(name, eager model, compiled model) -> whether the compiled one went in: it does only while
the eager one still serves (a reload or unload meanwhile drops it)."""


class Compiler:
    def __init__(self, swap: Swap) -> None:
        self.swap = swap
        self.started = False
        self.pending: list[tuple[str, ServedModel]] = []
        self.closed = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards ``started``, ``pending``, ``closed``, ``_threads``
        self._one_at_a_time = threading.Lock()

    def submit(self, name: str, model: ServedModel) -> None:
        """``model`` now serves as ``name``: compile it (now in the background once started,
        else when ``run_pending`` is called)."""
        if model.compiler is None:
            return
        with self._lock:
            if not self.started:
                self.pending.append((name, model))
                return
        self._background(name, model)

    def start(self) -> None:
        """The server serves: compile what was loaded so far, and from now on each model as it
        is loaded, in the background."""
        with self._lock:
            self.started = True
            pending, self.pending = self.pending, []
        for name, model in pending:
            self._background(name, model)

    def run_pending(self) -> list[str]:
        """Compile what was loaded since the last call, here and now; the names swapped."""
        with self._lock:
            pending, self.pending = self.pending, []
        return [name for name, model in pending if self.compile(name, model)]

    def _background(self, name: str, model: ServedModel) -> None:
        thread = threading.Thread(target=self.compile, args=(name, model),
                                  name=f"studio-compile-{name}", daemon=True)
        with self._lock:
            if self.closed:
                return
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def close(self, timeout: float = 120.0) -> None:
        """The server stops: start no more compiles and wait for the one running. A process
        that exits while torch traces in another thread aborts (``terminate called without an
        active exception``, exit status -6), and a trace cannot be interrupted."""
        with self._lock:
            self.closed = True
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread.is_alive():
                log.info("waiting for %s to finish before stopping", thread.name)
            thread.join(max(0.0, deadline - time.monotonic()))

    def compile(self, name: str, model: ServedModel) -> bool:
        """Compile ``model`` and swap it in; False (logged) when it stays as loaded."""
        assert model.compiler is not None
        with self._one_at_a_time:
            if self.closed:
                return False
            started = time.perf_counter()
            try:
                compiled = model.compiler()
            except Exception as exc:
                log.warning("model %s is not compiled (%s); it keeps serving as loaded", name,
                            _reason(exc))
                return False
            seconds = time.perf_counter() - started
            if self.closed:  # the server stopped meanwhile (``close``): nothing left to serve
                return False
            if not self.swap(name, model, compiled):
                log.info("model %s was replaced while it compiled; the compiled one is dropped", name)
                return False
        log.info("model %s compiled in %.2fs (%s) and swapped in", name, seconds,
                 compiled.compiled or "compiled")
        return True


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
