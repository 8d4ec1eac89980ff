"""Reusable pieces for HTTP benchmarks: start servers, load them, report.

- ``studio_server(key, *args, home=...)``: a real ``studio-plug serve`` subprocess on 127.0.0.1,
  port 0, ready once it printed its URL (``studio_plugins.testing.ServerProcess``).
- ``asgi_server("module:attr")``: any ASGI app on Hypercorn in a subprocess, configured as
  ``studio-plug serve`` configures it (asyncio loop, h11, no access log), so it is a fair floor.
- ``load(url, body, content_type, connections, duration)``: wrk with ``bench/wrk_post.lua`` (POSTs
  a body read from a file), or a Python client (threads + keep-alive ``http.client``) with a
  warning when wrk is missing. Returns a ``Result``: req/s and latency percentiles.
- ``print_table(rows)``: aligned columns.

Run ``python -m bench.harness asgi MODULE:ATTR --port 0`` to serve an ASGI app by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from studio_plugins.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
SETTLE_SECONDS = 12.0
"""Seconds to wait after a server is up before measuring it: past the heap's one refreeze
(core/process/heap.py: a full collection, ~200 ms, 10 s after a compiled model's swap)."""


# --- servers ----------------------------------------------------------------------------------


def bench_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for server subprocesses: the repo importable, nothing from the caller's
    studio settings leaking in (token, store, plugin switches)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("KERAS_BACKEND", "torch")
    env.update(extra or {})
    return env


class _Server(ServerProcess):
    """ServerProcess with the bench environment (and, for ASGI apps, our own launcher)."""

    def __init__(self, command: list[str] | None, *args: str, env: Mapping[str, str]) -> None:
        super().__init__(*args, env=env, startup_timeout=120)
        self.env = dict(env)  # exactly this environment: ServerProcess merged os.environ back in
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self._command = command

    @property
    def command(self) -> list[str]:
        return self._command + self.args if self._command else super().command


@contextlib.contextmanager
def studio_server(key: str, *args: str, home: Path | None = None,
                  env: Mapping[str, str] | None = None) -> Iterator[ServerProcess]:
    """``studio-plug serve KEY ARGS`` on 127.0.0.1, port 0, with ``--killafter 0``.

    ``home`` is the ``STUDIOML_HOME`` (default: a temporary one where ``KEY`` has no checkpoint,
    i.e. the identity model)."""
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="studio-bench-")))
            (home / "experiments" / key / "modeldir").mkdir(parents=True)
        args = (*args, "--killafter", "0") if "--killafter" not in args else args
        server = _Server(None, key, *args, env=bench_env({"STUDIOML_HOME": str(home), **(env or {})}))
        with server:
            yield server


@contextlib.contextmanager
def asgi_server(app: str, env: Mapping[str, str] | None = None) -> Iterator[ServerProcess]:
    """The ASGI app ``module:attr`` on Hypercorn in a subprocess, on 127.0.0.1, port 0."""
    command = [sys.executable, "-m", "bench.harness", "asgi", app]
    with _Server(command, env=bench_env(env)) as server:
        yield server


def _serve_asgi(app_path: str, host: str, port: int) -> None:
    """Hypercorn as ``core.process.serving`` runs it: our own socket (``fd://``), asyncio, no access log."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from core.process.serving import tune_malloc

    # glibc's malloc set up as `studio-plug serve` sets it up for itself: a floor on the default
    # thresholds maps and unmaps buffers differently, so the ratio would measure that too.
    tune_malloc()
    module_name, _, attr = app_path.partition(":")
    app = getattr(importlib.import_module(module_name), attr or "app")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.accesslog = None
    config.backlog = 1024

    async def main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, shutdown.set)
        address, bound_port = sock.getsockname()[:2]
        print(f"Serving {app_path} on http://{address}:{bound_port}/", flush=True)
        await serve(app, config, shutdown_trigger=shutdown.wait)

    asyncio.run(main())


async def echo_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The floor: a raw ASGI app that reads the whole body and returns it with its Content-Type."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    content_type = dict(scope["headers"]).get(b"content-type", b"application/octet-stream")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# --- load -------------------------------------------------------------------------------------


@dataclass
class Result:
    """One measured point. Latencies in milliseconds; ``errors`` counts failed or non-2xx replies."""

    label: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    client: str
    cpu_us: float | None = None
    """CPU time the server process spent per request (user + system; None if not measured).
    Unlike req/s it hardly moves when other processes compete for the machine."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` and all its threads (Linux ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, body: bytes, content_type: str, *, connections: int, duration: float,
         label: str = "", client: str = "auto", threads: int = 1, timeout: float = 10.0,
         pid: int | None = None) -> Result:
    """POST ``body`` to ``url`` over ``connections`` keep-alive connections for ``duration`` s.

    ``client``: ``wrk``, ``python`` or ``auto`` (wrk when installed, else Python with a warning).
    ``threads`` is wrk's ``-t`` (1 leaves the other cores to the server being measured).
    ``pid``: the server's process id, to measure its CPU time per request (``Result.cpu_us``)."""
    cpu_before = process_cpu_seconds(pid) if pid else None
    result = _load(url, body, content_type, connections, duration, label, client, threads, timeout)
    cpu_after = process_cpu_seconds(pid) if pid else None
    if cpu_before is not None and cpu_after is not None and result.requests:
        result.cpu_us = (cpu_after - cpu_before) / result.requests * 1e6
    return result


def _load(url: str, body: bytes, content_type: str, connections: int, duration: float, label: str,
          client: str, threads: int, timeout: float) -> Result:
    if client == "auto":
        client = "wrk" if have_wrk() else "python"
        if client == "python":
            warn("wrk is not installed (apt-get install wrk); using the Python client, which is "
                 "slower than the servers it measures: compare ratios, not absolute figures")
    if client == "wrk":
        return _load_wrk(url, body, content_type, connections, duration, label, threads, timeout)
    return _load_python(url, body, content_type, connections, duration, label, timeout)


def _load_wrk(url: str, body: bytes, content_type: str, connections: int, duration: float,
              label: str, threads: int, timeout: float) -> Result:
    with tempfile.NamedTemporaryFile(prefix="wrk-body-", suffix=".bin") as body_file:
        body_file.write(body)
        body_file.flush()
        command = [
            "wrk", "-t", str(max(1, min(threads, connections))), "-c", str(connections),
            "-d", f"{duration:g}s", "--timeout", f"{timeout:g}s", "-s", str(LUA_SCRIPT),
            url, "--", body_file.name, content_type,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    stats = None
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            stats = json.loads(line.removeprefix("WRK_JSON "))
    if completed.returncode != 0 or stats is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    seconds = stats["duration_us"] / 1e6
    errors = sum(stats[key] for key in ("connect_errors", "read_errors", "write_errors",
                                        "status_errors", "timeouts"))
    return Result(label, connections, stats["requests"], seconds, stats["requests"] / seconds,
                  stats["p50_us"] / 1e3, stats["p90_us"] / 1e3, stats["p99_us"] / 1e3, errors, "wrk")


def _load_python(url: str, body: bytes, content_type: str, connections: int, duration: float,
                 label: str, timeout: float) -> Result:
    parsed = urlparse(url)
    host, port, path = parsed.hostname or "127.0.0.1", parsed.port or 80, parsed.path or "/"
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start = threading.Barrier(connections + 1)
    deadline = [0.0]

    def worker(index: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        mine = latencies[index]
        start.wait()
        while (now := time.perf_counter()) < deadline[0]:
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if not 200 <= response.status < 300:
                    errors[index] += 1
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=timeout)
                continue
            mine.append(time.perf_counter() - now)
        connection.close()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in workers:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + duration
    start.wait()
    for thread in workers:
        thread.join(duration + timeout + 5)
    seconds = time.perf_counter() - began
    merged = sorted(value for per_connection in latencies for value in per_connection)

    def percentile(q: float) -> float:
        return merged[min(len(merged) - 1, int(q * len(merged)))] * 1e3 if merged else float("nan")

    return Result(label, connections, len(merged), seconds, len(merged) / seconds,
                  percentile(0.50), percentile(0.90), percentile(0.99), sum(errors), "python")


def check_echo(url: str, body: bytes, content_type: str,
               expect: Callable[[bytes], bool] | None = None) -> None:
    """One request before measuring: the server answers 200 (and ``expect(reply)`` holds)."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=30)
    try:
        connection.request("POST", parsed.path or "/", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        reply = response.read()
    finally:
        connection.close()
    if response.status != 200 or (expect is not None and not expect(reply)):
        raise RuntimeError(f"{url} answered {response.status}: {reply[:300]!r}")


# --- reporting --------------------------------------------------------------------------------


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    cells = [[str(cell) for cell in header], *[[_fmt(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def _fmt(cell: object) -> str:
    if isinstance(cell, float):
        return f"{cell:,.0f}" if abs(cell) >= 100 else f"{cell:.2f}"
    return str(cell)


def describe_machine() -> str:
    import platform

    return (f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
            f"{platform.machine()}, client: {'wrk' if have_wrk() else 'python'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.harness")
    commands = parser.add_subparsers(dest="command", required=True)
    asgi = commands.add_parser("asgi", help="serve an ASGI app (module:attr) on Hypercorn")
    asgi.add_argument("app")
    asgi.add_argument("--host", default="127.0.0.1")
    asgi.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "asgi":
        _serve_asgi(args.app, args.host, args.port)


if __name__ == "__main__":
    main()


def quiet_env(pythonpath: str | None = None) -> dict[str, str]:
    """The environment for a counted child: fixed hashing, and no OpenBLAS thread pool (its idle
    threads spin, and valgrind counts their instructions too: a different number each run)."""
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, root, env.get("PYTHONPATH")]))
    return env


def callgrind_instructions(command: Sequence[str], env: Mapping[str, str]) -> int:
    """The instructions ``command`` executes, counted by valgrind's callgrind (Debian's valgrind)."""
    with tempfile.TemporaryDirectory() as directory:
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/out",
                               *command], capture_output=True, text=True, env=dict(env), check=True)
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise SystemExit("valgrind printed no instruction count:\n" + done.stderr[-2000:])
