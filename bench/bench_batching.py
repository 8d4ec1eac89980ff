"""Batching by default, measured: the Keras MLP (784-256-10) on a server started with the default
options, beside the identity model on the same server and beside a server with batching off
(``--max-batch-size 1``), side by side in one run (each point measured ``--rounds`` times,
alternating the servers' order; medians shown). Before the servers start, in this process: the
served Keras call for batches of 1 to 128 rows (what the default maximum batch size rests on),
and the data plane's own time per lone request with and without batching (what batching by
default adds at low load, in µs that load on the machine hardly moves).

    python -m bench.bench_batching                 # 3 rounds x 10 s per point
    python -m bench.bench_batching -d 6 -w 2 -r 3  # what the README's figures used
    python -m bench.bench_batching -d 3 -w 1 -r 1  # quicker

Targets (issue 18: fast by default), both for the Keras MLP with the default options:

- 16 connections: its req/s / the identity model's on the same server >= 0.75;
- 1 connection: its p50 latency no more than 5 % above ``--max-batch-size 1``'s (a lone
  request never waits for a batch).

Requests: a pickled ``{"x": 1x784 float32}`` to both models, so the ratio is the model's cost.
The Keras call is whatever the server runs by default: the compiled graph, swapped in within a
second of the start, whose quick calls run on the event loop (core/dataplane/inline.py).
Measuring starts ``SETTLE_SECONDS`` after the servers are up, past the heap's one refreeze.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.bench_keras import KEY, time_calls, write_mlp
from bench.harness import (
    SETTLE_SECONDS,
    Result,
    check_echo,
    describe_machine,
    load,
    print_table,
    studio_server,
)

PICKLE = "application/python-pickle"
IDENTITY = "ident"
BATCH_SIZES = (1, 4, 16, 32, 64, 128)


def median_result(results: list[Result], key: str = "rps") -> Result:
    """The round with the median ``key`` (its other figures travel with it), for the tables."""
    ordered = sorted(results, key=lambda r: getattr(r, key))
    return ordered[len(ordered) // 2]


@contextlib.contextmanager
def mlp_home() -> Iterator[Path]:
    """A store with the MLP under ``KEY`` and an empty modeldir (the identity model) under
    ``IDENTITY``."""
    with tempfile.TemporaryDirectory(prefix="studio-bench-batching-") as directory:
        home = Path(directory)
        modeldir = home / "experiments" / KEY / "modeldir"
        modeldir.mkdir(parents=True)
        write_mlp(modeldir)
        (home / "experiments" / IDENTITY / "modeldir").mkdir(parents=True)
        yield home


def per_call(checkpoint: Path, seconds: float) -> list[list[object]]:
    """The served Keras call (the loader's ``predict``, as the server runs it) per batch size:
    median µs per call and per row."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    from studio_plugins import LoadOptions
    from studio_plugins.testing import make_host

    served = make_host().loaders()["keras"].load(checkpoint, LoadOptions())
    rows: list[list[object]] = []
    for size in BATCH_SIZES:
        x = np.random.default_rng(size).random((size, 784), dtype=np.float32)
        timed = time_calls(lambda x=x: served.predict({"x": x}), seconds)  # type: ignore[misc]
        rows.append([size, timed["p50_us"], timed["p50_us"] / size])
    return rows


def lone_request_cost(seconds: float) -> dict[str, float]:
    """The data plane's own time per lone request (one at a time, as from one connection), with
    the default options and with ``--max-batch-size 1``: best of five, µs. The model is an async
    no-op so that nothing but the data plane is timed; the difference is what batching by
    default adds at low load, and, unlike a latency over HTTP, it hardly moves with load."""
    from core.dataplane.plane import DataPlane, DataPlaneOptions
    from core.types import Payload, ServedModel

    async def noop(payload: Payload) -> Payload:
        return payload

    async def per_request(options: DataPlaneOptions) -> float:
        plane, model = DataPlane(options), ServedModel(predict=noop, platform="bench")
        payload = {"x": np.zeros((1, 784), np.float32)}
        best = float("inf")
        for _ in range(5):
            count, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds / 5:
                for _ in range(100):
                    await plane.infer(model, payload)
                count += 100
            best = min(best, (time.perf_counter() - began) / count)
        plane.close()
        return best * 1e6

    return {"defaults": asyncio.run(per_request(DataPlaneOptions())),
            "--max-batch-size 1": asyncio.run(per_request(DataPlaneOptions(max_batch_size=1)))}


def measure(points: dict[str, str], body: bytes, connections: int, args: argparse.Namespace,
            pids: dict[str, int]) -> dict[str, list[Result]]:
    """Each point ``rounds`` times, alternating the order: every round of each."""
    runs: dict[str, list[Result]] = {name: [] for name in points}
    names = list(points)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            if args.warmup > 0:
                load(points[name], body, PICKLE, connections=connections, duration=args.warmup)
            result = load(points[name], body, PICKLE, connections=connections,
                          duration=args.duration, label=f"{name} c{connections}", pid=pids[name])
            runs[name].append(result)
            print(f"  {name} c={connections} round {round_index + 1}: {result.rps:,.0f} req/s, "
                  f"p50 {result.p50_ms:.3f} ms", file=sys.stderr, flush=True)
    return runs


def round_ratio(runs: dict[str, list[Result]], top: str, bottom: str, key: str) -> float:
    """The median over rounds of ``top``'s ``key`` / ``bottom``'s in the same round: points
    measured back to back share the machine's state of the moment, which moves more than
    they differ on a shared VM."""
    ratios = sorted(getattr(a, key) / getattr(b, key)
                    for a, b in zip(runs[top], runs[bottom], strict=True))
    return ratios[len(ratios) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=2.0, help="warm-up seconds per point")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("--calls-seconds", type=float, default=1.0,
                        help="seconds per batch size for the in-process table")
    args = parser.parse_args(argv)

    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    body = pickle.dumps({"x": x}, protocol=5)
    print(f"# bench_batching: {describe_machine()}; {args.rounds} rounds x {args.duration:g}s "
          f"per point, medians; pickled 1x784 float32 ({len(body):,} B) to every model")

    with mlp_home() as home:
        # first, alone on the machine: the servers would compete with it for the cores
        calls = per_call(home / "experiments" / KEY / "modeldir" / "mlp.keras", args.calls_seconds)
        plane = lone_request_cost(2 * args.calls_seconds)
        with studio_server(KEY, "--model", f"{IDENTITY}={IDENTITY}", home=home) as defaults, \
                studio_server(KEY, "--max-batch-size", "1", home=home) as off:
            for url in (defaults.url, off.url):
                check_echo(url, body, PICKLE, lambda reply: pickle.loads(reply)["x"].shape == (1, 10))
            check_echo(defaults.url + f"models/{IDENTITY}", body, PICKLE)
            # The compiled model is swapped in within a second of the start; ten seconds later the
            # heap is collected once and frozen again without the eager model
            # (core/process/heap.py), a pause of ~200 ms that a round would otherwise include.
            time.sleep(SETTLE_SECONDS)
            pid = {"mlp, defaults": defaults.process.pid, "identity, defaults": defaults.process.pid,
                   "mlp, --max-batch-size 1": off.process.pid}
            urls = {"mlp, defaults": defaults.url,
                    "identity, defaults": defaults.url + f"models/{IDENTITY}",
                    "mlp, --max-batch-size 1": off.url}
            many_runs = measure(urls, body, args.connections, args, pid)
            lone_urls = {name: urls[name] for name in ("mlp, defaults", "mlp, --max-batch-size 1")}
            one_runs = measure(lone_urls, body, 1, args, pid)
    many = {name: median_result(results) for name, results in many_runs.items()}
    one = {name: median_result(results, "p50_ms") for name, results in one_runs.items()}

    print()
    print_table([[size, us, per_row] for size, us, per_row in calls],
                ["served Keras call, in process: rows", "µs per call", "µs per row"])
    print()
    print_table(
        [[name, r.rps, r.p50_ms, r.p99_ms, r.cpu_us, r.errors] for name, r in many.items()],
        [f"{args.connections} connections (cpu: the whole server's)", "req/s", "p50 ms", "p99 ms",
         "cpu us/req", "errors"],
    )
    ratio = round_ratio(many_runs, "mlp, defaults", "identity, defaults", "rps")
    off = round_ratio(many_runs, "mlp, --max-batch-size 1", "identity, defaults", "rps")
    print(f"Keras MLP, defaults, {args.connections} connections / identity on the same server, "
          f"req/s (median of the rounds' ratios): {ratio:.2f} (target >= 0.75: "
          f"{'met' if ratio >= 0.75 else 'MISSED'}); batching off: {off:.2f}")
    print()
    print_table(
        [[name, r.rps, r.p50_ms, r.p90_ms, r.p99_ms, r.errors] for name, r in one.items()],
        ["1 connection (median round by p50)", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"],
    )
    lone = round_ratio(one_runs, "mlp, defaults", "mlp, --max-batch-size 1", "p50_ms")
    print(f"Keras MLP, 1 connection, p50 defaults / --max-batch-size 1 (median of the rounds' "
          f"ratios): {lone:.3f} "
          f"(target <= 1.05: {'met' if lone <= 1.05 else 'MISSED'})")
    added = plane["defaults"] - plane["--max-batch-size 1"]
    share = 100 * added / (1e3 * one["mlp, --max-batch-size 1"].p50_ms)
    print(f"the data plane per lone request, in process (async no-op model): defaults "
          f"{plane['defaults']:.1f} µs, --max-batch-size 1 {plane['--max-batch-size 1']:.1f} µs: "
          f"batching by default adds {added:.1f} µs, {share:.2f} % of that p50")
    errors = sum(r.errors for r in [*many.values(), *one.values()])
    return 1 if errors or ratio < 0.75 or lone > 1.05 else 0


if __name__ == "__main__":
    sys.exit(main())
