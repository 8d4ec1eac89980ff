"""``--workers N``: load once, fork N workers that serve one inherited socket, supervise them.

The parent assembles everything (store, loader, wrapper, priming) and binds the socket, then
forks; copy-on-write keeps one copy of the weights for all workers. It never serves a request
itself: it replaces a worker that dies, counts idleness across all of them for ``--killafter``,
drains them on SIGTERM/SIGINT, and for ``--watch`` loads a new checkpoint once and re-forks the
workers one at a time from it (reloading in each worker would cost N copies of the weights).
The parent also compiles each model it loads (core/models/compiling.py), before the first fork
and, for a reload, before that re-fork: a roll right after start would close the connections a
draining worker had just accepted, and a compile in a background thread could be copied by a
fork mid-operation.

Restarts: a worker that ran ``early_death`` seconds (5) or more is replaced at once. One that
dies sooner never got going (a broken model or wrapper, a framework that cannot run after a
fork): its slot is re-forked after a delay that doubles from 0.5 s up to 16 s, so a crash loop
costs little, and after 5 such deaths in a row before the worker took a single request the
server exits 1 with one line saying so. A worker that dies *while serving* is backed off the
same way but never counts toward that exit: a request must not be able to stop the server.
A rolling reload's replaced workers are drained by the supervisor itself, never counted, and
logged at INFO as the planned replacements they are (a death is a WARNING: "exited (...)").

Fork rule (measured): after a framework has run a multi-threaded op in a process, a forked child
that runs it with more than one thread hangs (OpenMP's pool is not fork-safe). So the parent
runs with one intra-op thread, and each worker sets its own count after the fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from core.errors import StudioError
from core.http.activity import Activity
from core.process.shutdown import ShutdownRequests

log = logging.getLogger("studio_plugins.workers")

FIELDS = 3
"""Per slot in the shared table: requests in flight, when one was last seen (monotonic, which is
system-wide), and requests started since the fork (0: it died before taking any)."""


class WorkersDiedError(StudioError):
    """Workers keep dying right after their fork: nothing would ever serve."""


class SharedActivity(Activity):
    """A worker's Activity, mirrored into shared memory for the parent's idle count."""

    def __init__(self, table: ctypes.Array[ctypes.c_double], slot: int,
                 leaving: Any = None) -> None:
        self.leaving = leaving
        """The supervisor's shared flag: set, every worker answers not-ready (a plugin asked the
        server to go, core/process/shutdown.py)."""
        super().__init__()
        self.table = table
        self.slot = slot
        self._publish()

    @property
    def draining(self) -> bool:
        return self._draining or bool(self.leaving is not None and self.leaving.value)

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value

    def _publish(self) -> None:
        self.table[FIELDS * self.slot] = self.in_flight
        self.table[FIELDS * self.slot + 1] = self.last_seen

    def started(self) -> None:
        super().started()
        self.table[FIELDS * self.slot + 2] += 1
        self._publish()

    def finished(self) -> None:
        super().finished()
        self._publish()


@dataclass
class WorkerPlan:
    workers: int
    threads_per_worker: int
    killafter: float = 0.0
    watch: float = 0.0
    graceful_timeout: float = 30.0
    early_death: float = 5.0
    """A worker dead sooner than this after its fork never got going: restart it with backoff."""
    backoff_first: float = 0.5
    backoff_cap: float = 16.0
    max_early_deaths: int = 5
    """Early deaths in a row, before any request, after which the server gives up."""


ServeInWorker = Callable[[socket.socket, Activity], int]
"""Builds the app in the worker (after the fork) and serves until told to stop."""


class Supervisor:
    def __init__(
        self,
        sock: socket.socket,
        plan: WorkerPlan,
        serve: ServeInWorker,
        worker_init: Callable[[int], None],
        reload: Callable[[], bool] | None = None,
        on_worker_exit: Callable[[int], None] | None = None,
        requests: ShutdownRequests | None = None,
    ) -> None:
        self.sock = sock
        self.requests = requests
        self.leaving = multiprocessing.RawValue(ctypes.c_bool, False)
        self.stop_at: float | None = None
        """When a plugin's shutdown request stops the workers (monotonic)."""
        self.plan = plan
        self.serve = serve
        self.worker_init = worker_init
        self.reload = reload
        self.on_worker_exit = on_worker_exit
        self.table = multiprocessing.RawArray(ctypes.c_double, FIELDS * plan.workers)
        self.pids: dict[int, int] = {}  # slot -> pid
        self.forked_at: dict[int, float] = {}  # slot -> monotonic time of its worker's fork
        self.early: dict[int, int] = {}  # slot -> early deaths in a row (the backoff)
        self.unserved: dict[int, int] = {}  # slot -> of those, in a row before any request
        self.due: dict[int, float] = {}  # slot -> when its next worker is forked (backing off)
        self.stopping = False
        self.started = time.monotonic()

    # --- child ----------------------------------------------------------------------------

    def _fork(self, slot: int) -> int:
        self.table[FIELDS * slot] = 0
        self.table[FIELDS * slot + 1] = self.forked_at[slot] = time.monotonic()
        self.table[FIELDS * slot + 2] = 0
        # The garbage collector writes into every object it scans, so a worker's first full
        # collection would copy the parent's whole Python heap (Keras leaves ~100 MiB of it):
        # frozen objects are never scanned, and their pages stay shared. Measured: 4 workers of
        # the Keras MLP 2.44x the PSS of one without this, 1.27x with (bench/bench_workers.py).
        gc.collect()
        gc.freeze()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.pids[slot] = pid
            return pid
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent(parent)
            self.worker_init(self.plan.threads_per_worker)
            code = self.serve(self.sock, SharedActivity(self.table, slot, self.leaving))
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    # --- parent ---------------------------------------------------------------------------

    def run(self, on_started: Callable[[], None] | None = None) -> int:
        for slot in range(self.plan.workers):
            self._fork(slot)
        log.info("%d workers serving (pids %s)", self.plan.workers,
                 ", ".join(str(pid) for pid in self.pids.values()))
        if on_started is not None:
            on_started()

        def stop(signum: int, frame: FrameType | None) -> None:
            if not self.stopping:
                log.info("%s received; draining %d workers", signal.Signals(signum).name,
                         len(self.pids))
            self.stopping = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        if self.requests is not None:
            self.requests.attach(self._leave)
        next_watch = time.monotonic() + self.plan.watch
        try:
            while not self.stopping:
                time.sleep(0.1)
                self._reap_and_replace()
                if self.stop_at is not None and time.monotonic() >= self.stop_at:
                    break
                if self.plan.killafter and self._idle_for() >= self.plan.killafter:
                    log.info("no requests for %.0fs (--killafter); shutting down",
                             self.plan.killafter)
                    break
                if self.reload is not None and self.plan.watch and time.monotonic() >= next_watch:
                    gc.unfreeze()  # let the old model be collected once it is swapped out
                    if self.reload():
                        self._roll()
                    next_watch = time.monotonic() + self.plan.watch
        finally:
            self._drain()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def _leave(self, reason: str, drain: float) -> None:
        """A plugin's shutdown request (from its thread): every worker answers not-ready now;
        ``drain`` seconds later they are drained as on SIGTERM."""
        log.info("%s; not ready from now on, stopping in %gs, then draining %d workers",
                 reason, drain, len(self.pids))
        self.leaving.value = True
        self.stop_at = time.monotonic() + drain

    def _idle_for(self) -> float:
        in_flight = sum(self.table[FIELDS * slot] for slot in self.pids)
        if in_flight:
            return 0.0
        last = max([self.started, *(self.table[FIELDS * slot + 1] for slot in self.pids)])
        return time.monotonic() - last

    def _reap(self) -> list[tuple[int, int, int]]:
        """(slot, pid, status) of each worker that has exited (collected, so no zombies)."""
        dead = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for slot, worker in list(self.pids.items()):
                if worker == pid:
                    del self.pids[slot]
                    dead.append((slot, pid, status))
                    if self.on_worker_exit is not None:
                        self.on_worker_exit(pid)
        return dead

    def _reap_and_replace(self) -> None:
        now = time.monotonic()
        for slot, pid, status in self._reap():
            if self.stopping:
                break
            self.due[slot] = now + self._backoff(slot, pid, status, now)
        for slot, when in sorted(self.due.items()):
            if when <= now and not self.stopping:
                del self.due[slot]
                self._fork(slot)

    def _backoff(self, slot: int, pid: int, status: int, now: float) -> float:
        """Seconds to wait before re-forking ``slot`` (raises once its workers keep dying)."""
        plan = self.plan
        lived = now - self.forked_at.get(slot, self.started)
        how = _describe_status(status)
        if lived >= plan.early_death:
            self.early[slot] = self.unserved[slot] = 0
            log.warning("worker %d exited (%s); starting a new one", pid, how)
            return 0.0
        served = self.table[FIELDS * slot + 2] > 0
        self.early[slot] = self.early.get(slot, 0) + 1
        self.unserved[slot] = 0 if served else self.unserved.get(slot, 0) + 1
        if self.unserved[slot] >= plan.max_early_deaths:
            raise WorkersDiedError(
                f"the workers die at start: {self.unserved[slot]} in a row died before taking "
                f"a request, the last (pid {pid}) {lived:.1f}s after its fork "
                f"({_describe_status(status)})",
                hint="check the model or wrapper; run with --workers 1 or --debug to see why",
            )
        delay = min(plan.backoff_cap, plan.backoff_first * 2 ** (self.early[slot] - 1))
        log.warning("worker %d exited (%s) %.1fs after its fork%s; starting a new one in %.1fs",
                    pid, how, lived, "" if served else " before taking a request", delay)
        return delay

    def _roll(self) -> None:
        """Re-fork every worker from the parent's new model, one at a time, each old one
        drained gracefully, so the socket always has workers accepting."""
        for slot in sorted(self.pids):
            old = self.pids[slot]
            new = self._fork(slot)  # the new worker takes the slot; the old one drains
            # planned, not a crash: said at INFO, in words unlike a death's ("exited (...)")
            log.info("rolling reload: worker %d replaces worker %d, which finishes its requests "
                     "and stops", new, old)
            os.kill(old, signal.SIGTERM)
            self._wait_for(old, self.plan.graceful_timeout + 5)
        log.info("workers now serve the new model (pids %s)",
                 ", ".join(str(pid) for pid in self.pids.values()))

    def _wait_for(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                if self.on_worker_exit is not None:
                    self.on_worker_exit(pid)
                return
            time.sleep(0.05)
        log.warning("worker %d did not stop within %.0fs; killed", pid, timeout)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    def _drain(self) -> None:
        self.stopping = True
        self.due.clear()
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(self.pids.values()):
            self._wait_for(pid, self.plan.graceful_timeout + 5)
        self.pids.clear()
        log.info("all workers stopped")


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM (a graceful drain) when the parent dies, even by SIGKILL, instead
    of serving on as an orphan nobody supervises (Linux: PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


PR_SET_PDEATHSIG = 1


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.WEXITSTATUS(status)}"
