"""Run an app under Hypercorn on a socket we bind ourselves, with our own shutdown rules.

We bind first (so ``--port 0`` can report the port it got, errors come before anything starts,
and later worker processes can share the socket), then hand Hypercorn the descriptor
(``fd://N``), and for HTTPS the TLS context built at start (core/process/tls.py), which wraps
every connection accepted. SIGINT/SIGTERM and ``--killafter`` idleness set one shutdown event;
Hypercorn then stops accepting and lets in-flight requests finish within ``graceful_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.types import ASGIApp

from core.http.activity import Activity
from core.http.listeners import ListenerGroup
from core.process.shutdown import ShutdownRequests
from core.process.sockets import bind_socket

log = logging.getLogger("studio_plugins.serving")



# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep request-sized buffers in the heap instead of mapping and unmapping them per request.

    By default glibc serves every buffer over ~128 KiB with its own mmap and returns freed memory
    to the OS at once, so a large request (a 600 KB image) faults fresh pages in for its body,
    its array and its reply, every time: measured, that tripled the CPU per large request
    (bench/bench_http.py). The thresholds are raised as ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` would; a user who set either keeps their own. Returns whether it
    applied (glibc only)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def check_port_free(host: str, port: int) -> None:
    """Fail fast, before a long model load, when ``host:port`` is taken (port 0 always works).
    The real bind comes after assembly, so assembly errors never hold the port."""
    if port:
        bind_socket(host, port).close()


WILDCARDS = frozenset({"0.0.0.0", "::"})


def socket_url(sock: socket.socket, name: str | None = None, *, tls: bool = False) -> str:
    """The URL a person on this machine opens: ``localhost`` for a wildcard bind (0.0.0.0 is an
    address to listen on, not one to connect to). With ``tls`` the URL names the host as
    ``--host`` gave it (``name``), not the address it resolved to: a certificate names hosts, and
    to a client that checks it ``localhost`` is not ``127.0.0.1``."""
    host, port = sock.getsockname()[:2]
    if tls and name and name not in WILDCARDS:
        host = name
    if host in WILDCARDS:
        host = "localhost"
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def outside_url(sock: socket.socket, *, tls: bool = False) -> str | None:
    """For a wildcard bind, the URL other machines may use: this machine's outgoing address
    (no packet is sent to find it), else its host name; None for a bind to one address."""
    host, port = sock.getsockname()[:2]
    if host not in WILDCARDS:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route, sends nothing
            address = probe.getsockname()[0]
    except OSError:
        address = ""
    if not address or address.startswith("127.") or address in WILDCARDS:
        address = socket.gethostname()
    return f"{'https' if tls else 'http'}://{address}:{port}/"


async def _idle_watch(activity: Activity, killafter: float, shutdown: asyncio.Event) -> None:
    interval = min(1.0, max(0.05, killafter / 4))
    while not shutdown.is_set():
        await asyncio.sleep(interval)
        if activity.idle_for() >= killafter:
            log.info("no requests for %.0fs (--killafter); shutting down", killafter)
            shutdown.set()


async def _stop_on(shutdown: asyncio.Event, listeners: ListenerGroup, grace: float) -> None:
    await shutdown.wait()
    await listeners.stop(grace)


def _not_hypercorn_banner(record: logging.LogRecord) -> bool:
    # Hypercorn's own "Running on http://0.0.0.0:5000" names the address it listens on, which a
    # browser cannot open; our "Serving ... on" line says where to go instead
    return not str(record.msg).startswith("Running on")


_HYPERCORN_LOG = logging.getLogger("hypercorn.error")
_HYPERCORN_LOG.addFilter(_not_hypercorn_banner)

HEADER_TIMEOUT = 5.0
HEADER_LIMIT = 16 * 1024
APP_QUEUE = 10
HANDSHAKE_TIMEOUT = 10.0


class ServerConfig(Config):
    """Hypercorn's settings, serving HTTPS with the context built and checked at start
    (core/process/tls.py) instead of reading the certificate files again in every process."""

    tls: ssl.SSLContext | None = None

    @property
    def ssl_enabled(self) -> bool:
        return self.tls is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self.tls


def hypercorn_config(read_timeout: float = 0, tls: ssl.SSLContext | None = None) -> Config:
    """Hypercorn's settings, the ones that guard against slow or greedy clients set explicitly
    (so a change of Hypercorn's defaults cannot drop them silently).

    - ``keep_alive_timeout``: Hypercorn's idle timer runs from the connection's start (and from
      the end of each response) until a request's headers are complete, so it is the header
      timeout too: a client trickling its headers (slowloris) is closed after it. 5 s (Hypercorn's
      default), or ``--read-timeout`` when that is shorter.
    - ``h11_max_incomplete_size``: the most header bytes buffered before the request is
      complete (over it: 431 and close).
    - ``max_app_queue_size``: body messages (each up to 64 KiB) queued per request before
      Hypercorn stops reading the socket: the memory a body can take before we read it.
    - ``read_timeout`` is left unset: it is a timeout per socket read, which also fires while a
      client waits for a long model call (it sends nothing meanwhile) and so would cancel it,
      and on Python 3.11 ``asyncio.wait_for`` wraps every read in a task. The body timeout is
      ours (``--read-timeout``, core/http/body_guard.py).
    - ``backlog``: connections the kernel queues before we accept them.
    - ``ssl_handshake_timeout`` (HTTPS): Hypercorn's 60 s would let a client that connects and
      sends nothing hold its connection for a minute, before the header timeout even starts.
      10 s, or ``--read-timeout`` when that is shorter (as for the headers).
    """
    config = ServerConfig()
    config.tls = tls
    config.ssl_handshake_timeout = (min(HANDSHAKE_TIMEOUT, read_timeout) if read_timeout > 0
                                    else HANDSHAKE_TIMEOUT)
    config.accesslog = None
    config.errorlog = _HYPERCORN_LOG
    config.backlog = 1024
    config.keep_alive_timeout = min(HEADER_TIMEOUT, read_timeout) if read_timeout > 0 else HEADER_TIMEOUT
    config.h11_max_incomplete_size = HEADER_LIMIT
    config.max_app_queue_size = APP_QUEUE
    return config


def run_server(
    app: ASGIApp,
    sock: socket.socket,
    activity: Activity,
    *,
    killafter: float = 0,
    graceful_timeout: float = 30.0,
    read_timeout: float = 0,
    worker: bool = False,
    tls: ssl.SSLContext | None = None,
    requests: ShutdownRequests | None = None,
    listeners: ListenerGroup | None = None,
) -> int:
    """Serve ``app`` on ``sock`` until a signal, idleness or a plugin's request; returns the
    exit status (0).
    ``worker``: a forked worker, whose signal comes from its supervisor (a drain, or its planned
    replacement in a rolling reload): its lines name the worker, not the server. ``tls``: serve
    HTTPS with this context (core/process/tls.py): every connection accepted is wrapped.
    ``requests``: a plugin's shutdown requests (core/process/shutdown.py). ``listeners``: the
    plugins' listeners (gRPC) the app starts: stopped as Hypercorn stops accepting, so both
    protocols drain within the same ``graceful_timeout``."""
    who = f"worker {os.getpid()}" if worker else "server"
    config = hypercorn_config(read_timeout, tls)
    # Hypercorn takes ownership of the descriptor it is given (and closes it): give it a copy.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.graceful_timeout = graceful_timeout

    async def main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            log.info("%s%s received; finishing %d request(s) in flight",
                     f"{who}: " if worker else "", signal.Signals(signum).name, activity.in_flight)
            activity.draining = True
            shutdown.set()

        def on_request(reason: str, drain: float) -> None:  # on the event loop
            log.info("%s; not ready from now on, stopping in %gs, then finishing the request(s) "
                     "in flight", reason, drain)
            activity.draining = True
            loop.call_later(drain, stop_accepting)

        def stop_accepting() -> None:
            shutdown.set()
            # Hypercorn closes its copy of the socket; without ours closed too, the kernel
            # would still queue new connections that nobody will ever accept
            if not worker:
                sock.close()

        def from_thread(reason: str, drain: float) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: already shut down
                loop.call_soon_threadsafe(on_request, reason, drain)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if requests is not None:
            requests.attach(from_thread)
        background = []
        if killafter > 0:
            background.append(asyncio.create_task(_idle_watch(activity, killafter, shutdown)))
        if listeners:
            background.append(asyncio.create_task(_stop_on(shutdown, listeners, graceful_timeout)))
        try:
            await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    asyncio.run(main())
    log.info("%s stopped", who)
    return 0
