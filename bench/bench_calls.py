"""Python function calls per request on real servers: ours against the echo, under cProfile.

``studio-plug serve`` on the identity model and bench_http's raw ASGI echo on the same Hypercorn,
each run under ``python -m cProfile`` and loaded by wrk with small pickles (16 connections, after a
warm-up); SIGTERM stops both gracefully, so cProfile writes its file. Each function's calls are
divided by every request the server answered (warm-up included), and the functions whose calls per
request differ most between the two are listed: what our request path adds, Hypercorn's work for
it included. cProfile slows a server several times over, so its times are no figures here; its
call counts are exact.

    python -m bench.bench_calls               # 5 s of load after 2 s of warm-up
    python -m bench.bench_calls --top 60
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import pstats
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.harness import _Server, bench_env, describe_machine, load

PICKLE = "application/python-pickle"
KEY = "ident"


@contextlib.contextmanager
def profiled(command: list[str], *args: str, profile: Path, home: Path) -> Iterator[_Server]:
    """``command ARGS`` under cProfile, writing ``profile`` when it stops."""
    server = _Server([sys.executable, "-m", "cProfile", "-o", str(profile), *command], *args,
                     env=bench_env({"STUDIOML_HOME": str(home)}))
    with server:
        yield server
    if server.process is not None and server.process.returncode != 0:
        raise RuntimeError(f"{command} exited with {server.process.returncode}:\n{server.output()}")


def calls_per_request(profile: Path, requests: int) -> dict[str, float]:
    """Each function's calls per request, by ``file:line(name)``."""
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for (filename, line, name), (_, calls, *_) in stats.items():
        where = filename.split("site-packages/")[-1].split("/lib/python3.11/")[-1]
        found[f"{where}:{line}({name})"] = calls / requests
    return found


def measure(command: list[str], *args: str, home: Path, seconds: float, warmup: float) -> dict[str, float]:
    body = pickle.dumps({"x": np.random.default_rng(0).random(10)}, protocol=5)
    with tempfile.TemporaryDirectory(prefix="studio-bench-calls-") as directory:
        profile = Path(directory) / "profile"
        with profiled(command, *args, profile=profile, home=home) as server:
            answered = 0
            for duration in (warmup, seconds):
                answered += load(server.url, body, PICKLE, connections=16, duration=duration,
                                 client="wrk").requests
        return calls_per_request(profile, answered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_calls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds of load")
    parser.add_argument("-w", "--warmup", type=float, default=2.0)
    parser.add_argument("--top", type=int, default=40, help="functions to list")
    args = parser.parse_args(argv)
    print(f"# bench_calls: {describe_machine()}; small pickle, 16 connections, under cProfile")
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as directory:
        home = Path(directory)
        (home / "experiments" / KEY / "modeldir").mkdir(parents=True)
        ours = measure(["-m", "studio_plugins", "serve"], KEY, "--killafter", "0", home=home,
                       seconds=args.duration, warmup=args.warmup)
        echo = measure(["-m", "bench.harness", "asgi", "bench.harness:echo_app"], home=home,
                       seconds=args.duration, warmup=args.warmup)
    print(f"calls per request: ours {sum(ours.values()):,.0f}, echo {sum(echo.values()):,.0f}")
    differ = sorted(set(ours) | set(echo), key=lambda f: -abs(ours.get(f, 0) - echo.get(f, 0)))
    print(f"{'ours - echo':>11}  {'ours':>7}  {'echo':>7}  function")
    for function in differ[:args.top]:
        mine, theirs = ours.get(function, 0.0), echo.get(function, 0.0)
        print(f"{mine - theirs:+11.2f}  {mine:7.2f}  {theirs:7.2f}  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
