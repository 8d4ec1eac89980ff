"""``serve``: pick the backend, and (for local serving) assemble, bind and run.

Order matters: everything that can fail in assembly fails before the port is bound.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from core.dataplane.metrics import MULTIPROCESS_ENV, mark_worker_dead
from core.dataplane.plane import DataPlaneOptions
from core.errors import ConfigurationError
from core.host import PluginHost
from core.http.activity import Activity
from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.http.listeners import ListenerGroup
from core.models.repository import ModelRepository
from core.options import serve_argv
from core.process.heap import HeapKeeper
from core.process.interrupt import exit_on_interrupt
from core.process.serving import (
    check_port_free,
    outside_url,
    run_server,
    socket_url,
    tune_malloc,
)
from core.process.shutdown import ShutdownRequests
from core.process.sockets import bind_socket
from core.process.tls import server_context
from core.process.workers import Supervisor, WorkerPlan
from core.types import ServeOptions

log = logging.getLogger("studio_plugins.launch")

WORKER_BACKLOG = 2048


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(workers: int) -> int:
    """Intra-op threads (torch, Keras on it) per serving process: the usable cores shared out
    among the workers; one process alone leaves a core to its event loop. At least one.

    Measured for one process (the Keras MLP compiled, 16 connections, 2 cores): two intra-op
    threads took 654 µs of CPU per request against 362 with one, for the same requests per
    second: the second thread mostly spins waiting for work while the loop needs the core."""
    if workers <= 1:
        return max(1, usable_cores() - 1)
    return max(1, usable_cores() // workers)


def announce(repository: ModelRepository, sock: socket.socket, extra: str = "", *,
             host: str | None = None, tls: bool = False,
             listeners: ListenerGroup | None = None) -> None:
    # The "Serving" line on stdout: scripts and tests wait for it, so the listeners' lines
    # (gRPC) come first: once it is read, they have been too.
    if listeners:
        listeners.wait_started()  # at once for one process: its listeners started before this
        for listener in listeners.opened:
            print(f"  {listener.description}", flush=True)
    url = socket_url(sock, host, tls=tls)
    print(f"Serving {', '.join(repository.names())}{extra} on {url}", flush=True)
    elsewhere = outside_url(sock, tls=tls)
    if elsewhere is not None:
        print(f"  listening on every interface: from another machine, {elsewhere}", flush=True)


@dataclass
class Launch:
    """The ``LaunchContext`` handed to backends."""

    host: PluginHost
    options: ServeOptions

    def assemble(self, cleanup: Callable[[], None] | None = None) -> ModelRepository:
        """Every model, loaded in parallel threads (errors name the model that failed). Ctrl-C
        or SIGTERM meanwhile exits 0 at once, after ``cleanup``: core/process/interrupt.py."""
        repository = ModelRepository(self.host, self.options)
        with exit_on_interrupt("loading models", cleanup):
            repository.load_all()
        return repository

    def serve_here(self) -> int:
        options = self.options
        tune_malloc()  # before loading: workers inherit it across the fork
        # the certificate and key are checked (and read) before the port and the model
        tls = server_context(options.certfile, options.keyfile, options.ca_certs)
        check_port_free(options.host, options.port)
        listeners = self.reserve_listeners()
        try:
            if options.workers > 1:
                return self._serve_with_workers(tls, listeners)
            return self._serve_alone(tls, listeners)
        finally:
            listeners.release()

    def reserve_listeners(self) -> ListenerGroup:
        """The plugins' listeners the options ask for (``--grpc-port``), their ports held from
        now on: before the models load, so a taken port or a missing extra costs no load."""
        opened = []
        try:
            for listener in self.host.listeners().values():
                reserved = listener.reserve(self.options)
                if reserved is not None:
                    opened.append(reserved)
        except BaseException:
            ListenerGroup(opened).release()
            raise
        return ListenerGroup(opened)

    def _serve_alone(self, tls: ssl.SSLContext | None, listeners: ListenerGroup) -> int:
        options = self.options
        if options.threads_per_worker or not os.environ.get("OMP_NUM_THREADS"):
            self.host.configure_threads(options.threads_per_worker or default_threads(1))
        repository = self.assemble()
        sock = bind_socket(options.host, options.port)
        activity = Activity()

        def on_ready() -> None:
            announce(repository, sock, host=options.host, tls=tls is not None, listeners=listeners)
            if repository.compiler is not None:  # serving: compile in the background now
                repository.compiler.start()

        settings = self._settings(activity, watch=options.watch, on_ready=on_ready)
        settings.heap = HeapKeeper()
        settings.listeners = listeners
        app = build_app(repository, settings, self.host.route_factories())
        settings.heap.freeze()  # everything loaded so far lives as long as the server
        requests = ShutdownRequests()
        self.host.watch_shutdown(options, requests.request)
        try:
            with sock:
                return run_server(app, sock, activity, killafter=options.killafter,
                                  read_timeout=options.read_timeout, tls=tls, requests=requests,
                                  listeners=listeners)
        finally:
            if repository.compiler is not None:
                repository.compiler.close()

    def _serve_with_workers(self, tls: ssl.SSLContext | None, listeners: ListenerGroup) -> int:
        """Load once here, fork the workers, supervise them (core/process/workers.py)."""
        options = self.options
        self.host.configure_threads(1)  # before anything runs: see core/process/workers.py
        metrics_dir = None
        if options.metrics:
            metrics_dir = tempfile.mkdtemp(prefix="studio-metrics-")
            os.environ[MULTIPROCESS_ENV] = metrics_dir  # before prometheus_client is imported
        cleanup = (lambda: shutil.rmtree(metrics_dir, ignore_errors=True)) if metrics_dir else None
        try:
            repository = self.assemble(cleanup=cleanup)

            def compile_pending() -> bool:
                # here in the parent, before the workers are forked (core/process/workers.py)
                return repository.compiler is not None and bool(repository.compiler.run_pending())

            with exit_on_interrupt("compiling models", cleanup):
                compile_pending()  # the first answer waits for it: a fraction of the load's time
            sock = bind_socket(options.host, options.port, backlog=WORKER_BACKLOG)
            routes = self.host.route_factories()

            def serve_in_worker(sock: socket.socket, activity: Activity) -> int:
                settings = self._settings(activity, watch=0.0, on_ready=None)
                settings.in_worker = True
                settings.listeners = listeners  # this worker's copy, started on its own loop
                app = build_app(repository, settings, routes)
                return run_server(app, sock, activity, killafter=0,
                                  read_timeout=options.read_timeout, worker=True, tls=tls,
                                  listeners=listeners)

            plan = WorkerPlan(
                workers=options.workers,
                threads_per_worker=options.threads_per_worker or default_threads(options.workers),
                killafter=options.killafter,
                watch=options.watch,
            )
            requests = ShutdownRequests()
            self.host.watch_shutdown(options, requests.request)
            supervisor = Supervisor(
                sock, plan, serve_in_worker,
                worker_init=self.host.configure_threads,
                reload=lambda: bool(repository.poll()) | compile_pending(),
                on_worker_exit=mark_worker_dead if metrics_dir else None,
                requests=requests,
            )
            with sock:
                return supervisor.run(
                    on_started=lambda: announce(repository, sock, f" ({options.workers} workers)",
                                                host=options.host, tls=tls is not None,
                                                listeners=listeners)
                )
        finally:
            if metrics_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _settings(
        self, activity: Activity, watch: float, on_ready: Callable[[], None] | None
    ) -> AppSettings:
        options = self.options
        return AppSettings(
            codecs=CodecSet(self.host.codecs()),
            token=options.token,
            max_body=options.max_body,
            read_timeout=options.read_timeout,
            min_rate=options.min_rate,
            body_budget=options.body_budget,
            debug=options.debug,
            dataplane=DataPlaneOptions(
                threads=options.threads,
                max_queue=options.max_queue,
                timeout=options.timeout,
                max_batch_size=options.max_batch_size,
                max_batch_delay=options.max_batch_delay / 1000,
            ),
            metrics=options.metrics,
            access_log=options.access_log,
            watch=watch,
            activity=activity,
            on_ready=on_ready,
            cors=options.cors,
        )

    def serve_argv(self, options: ServeOptions | None = None) -> list[str]:
        """The ``studio-plug serve`` command line for these options, or for ``options`` (a
        backend's ``dataclasses.replace`` of them): core/options.py. Backend options and the
        token are left out: a backend passes the token its own way (``serve_environment``:
        ``STUDIO_TOKEN`` keeps it out of process listings)."""
        return serve_argv(options or self.options)


def launch(host: PluginHost, options: ServeOptions, cloud: str = "local") -> int:
    backends = host.backends()
    if cloud not in backends:
        raise ConfigurationError(
            f"no backend named {cloud!r}", hint=f"backends installed: {', '.join(sorted(backends))}"
        )
    return backends[cloud].launch(Launch(host, options))
