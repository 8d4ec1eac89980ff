"""Our ASGI app against the raw echo app, called in process: no sockets, no Hypercorn.

What is left is exactly what our request path adds: the middleware, body reading, decoding the
pickle, the data plane, metrics, encoding. Each app answers ``--requests`` small pickled requests
(``{"x": 10 float64}``, the identity model) driven straight through its ASGI callable; the last row
sends the same array as a V2 JSON request (``POST /v2/models/bench/infer``).

Two measures:

- wall time per request, the median of ``--rounds`` (moves with whatever else the machine does);
- with ``--callgrind``, instructions per request counted by valgrind: each app is run at two
  request counts and the difference divided, so start-up cancels out. The count is the same
  from run to run whatever the machine is doing, which makes it the figure to compare commits
  by on a noisy machine (``--pythonpath DIR`` runs another checkout's ``core``, e.g. a git
  worktree of an older commit).

    python -m bench.bench_inprocess
    python -m bench.bench_inprocess --callgrind                         # ~3 min
    python -m bench.bench_inprocess --callgrind --pythonpath /tmp/old   # another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import callgrind_instructions, describe_machine, echo_app, print_table, quiet_env

KEY = "bench"
APPS = ("ours (metrics on)", "ours (metrics off)", "raw ASGI echo", "ours, V2 JSON (metrics on)")


def build(which: str, home: Path) -> Any:
    """The ASGI app called ``which``, serving the identity model from ``home``."""
    if which == "raw ASGI echo":
        return echo_app
    os.environ["STUDIOML_HOME"] = str(home)
    from core.http.app import AppSettings, build_app
    from core.http.codecs import CodecSet
    from core.models.repository import ModelRepository
    from core.types import ServeOptions
    from studio_plugins.testing import make_host

    host = make_host()
    options = ServeOptions(keys=(KEY,), metrics=which != "ours (metrics off)")
    repository = ModelRepository(host, options)
    repository.load_all()
    settings = AppSettings(codecs=CodecSet(host.codecs()), metrics=options.metrics)
    return build_app(repository, settings, host.route_factories())


def drive(app: Any, requests: int, v2: bool = False) -> float:
    """Seconds for ``requests`` POSTs of the small pickle (``v2``: as V2 JSON) through ``app``."""
    x = np.random.default_rng(0).random(10)
    body = pickle.dumps({"x": x}, protocol=5)
    path, content_type = "/", b"application/python-pickle"
    if v2:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [10],
                                       "data": x.tolist()}]}).encode()
        path, content_type = f"/v2/models/{KEY}/infer", b"application/json"
    scope = {
        "type": "http", "method": "POST", "path": path, "query_string": b"", "root_path": "",
        "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 5000),
        "client": ("127.0.0.1", 1),
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type),
                    (b"content-length", b"%d" % len(body))],
    }
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(reply: dict[str, Any]) -> None:
        if reply["type"] == "http.response.start":
            statuses.append(reply["status"])

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(requests):
            await app(dict(scope), receive, send)
        return time.perf_counter() - started

    seconds = asyncio.run(run())
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses {sorted(set(statuses))}")
    return seconds


def one(which: str, requests: int) -> None:
    """Child process: build ``which``, answer ``requests`` requests, print the seconds."""
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as directory:
        home = Path(directory)
        (home / "experiments" / KEY / "modeldir").mkdir(parents=True)
        app = build(which, home)
        print(drive(app, requests, v2="V2" in which))


def child(which: str, requests: int, pythonpath: str | None, callgrind: bool) -> int:
    """Seconds (or, under callgrind, instructions) for one app in a fresh process."""
    env = quiet_env(pythonpath)
    # run as a script, not with -m: -m puts the current directory ahead of PYTHONPATH
    command = [sys.executable, __file__, "--one", which, "--requests", str(requests)]
    if callgrind:
        return callgrind_instructions(command, env)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return int(float(done.stdout.strip().splitlines()[-1]) * 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_inprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per timing")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per request with valgrind instead of timing")
    parser.add_argument("--pythonpath", default=None,
                        help="put this checkout first on the path (measure another commit)")
    parser.add_argument("--one", choices=APPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(args.one, args.requests)
        return 0

    print(f"# bench_inprocess: {describe_machine()}; small pickle, identity model"
          + (f"; core from {args.pythonpath}" if args.pythonpath else ""))
    rows = []
    for which in APPS:
        if args.callgrind:
            few, many = 500, 2500
            counts = [child(which, n, args.pythonpath, callgrind=True) for n in (few, many)]
            rows.append([which, (counts[1] - counts[0]) / (many - few)])
        else:
            rounds = [child(which, args.requests, args.pythonpath, callgrind=False) / args.requests / 1e3
                      for _ in range(args.rounds)]
            rows.append([which, statistics.median(rounds)])
        print(f"  {which}: {rows[-1][1]:,.1f}", file=sys.stderr, flush=True)
    unit = "instructions/request" if args.callgrind else "us/request (median)"
    print_table(rows, ["app (in process)", unit])
    return 0


if __name__ == "__main__":
    sys.exit(main())
