"""A Keras MLP (784-256-10) served by `studio-plug serve`, beside the model's own time in process.

The checkpoint is written to a temporary store and served by the real server (Keras loader, the
default); requests are a pickled ``{"x": 1x784 float32}`` at 1 and 16 connections. In the same
run, in this process, the same checkpoint is loaded through the same loader and timed:

- ``served call``: what the server runs per request (``ServedModel.predict``: cast and check the
  input, the Keras call under ``torch.inference_mode``, outputs to numpy);
- ``keras predict``: Keras's own ``model.predict`` for the same batch, for reference (the
  loader calls the model directly because ``predict`` costs more per call).

The server's overhead per request is the time per request (1/req/s) minus the served call: the
column "not in the model".

    python -m bench.bench_keras                  # 10 s per point after a 3 s warm-up
    python -m bench.bench_keras -d 3 -w 1        # quicker
    python -m bench.bench_keras --json out.json  # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Result, check_echo, describe_machine, load, print_table, studio_server

PICKLE = "application/python-pickle"
KEY = "mlp"


def write_mlp(modeldir: Path) -> Path:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    path = modeldir / "mlp.keras"
    model.save(path)
    return path


def time_calls(call: Callable[[], Any], seconds: float) -> dict[str, float]:
    """Median and p99 of ``call()`` in microseconds, over ``seconds`` after 20 warm-up calls."""
    for _ in range(20):
        call()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    samples.sort()
    return {"p50_us": statistics.median(samples) * 1e6,
            "p99_us": samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e6,
            "calls": float(len(samples))}


def in_process(checkpoint: Path, x: np.ndarray, seconds: float) -> dict[str, dict[str, float]]:
    import keras

    from studio_plugins import LoadOptions
    from studio_plugins.testing import make_host

    served = make_host().loaders()["keras"].load(checkpoint, LoadOptions())
    model = keras.saving.load_model(checkpoint, compile=False)
    return {
        "served call": time_calls(lambda: served.predict({"x": x}), seconds),
        "keras predict": time_calls(lambda: model.predict(x, verbose=0), seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_keras", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=3.0, help="warm-up seconds per point")
    parser.add_argument("-c", "--connections", default="1,16", help="comma-separated")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    connection_counts = [int(c) for c in args.connections.split(",")]

    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    body = pickle.dumps({"x": x}, protocol=5)
    print(f"# bench_keras: {describe_machine()}; MLP 784-256-10, pickled 1x784 float32 "
          f"({len(body):,} B); {args.duration:g}s per point after {args.warmup:g}s warm-up")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="studio-bench-keras-") as directory:
        home = Path(directory)
        modeldir = home / "experiments" / KEY / "modeldir"
        modeldir.mkdir(parents=True)
        checkpoint = write_mlp(modeldir)
        with studio_server(KEY, home=home) as server:
            check_echo(server.url, body, PICKLE, lambda reply: pickle.loads(reply)["x"].shape == (1, 10))
            for connections in connection_counts:
                common = dict(connections=connections, client=args.client, threads=args.threads)
                if args.warmup > 0:
                    load(server.url, body, PICKLE, duration=args.warmup, **common)
                result = load(server.url, body, PICKLE, duration=args.duration,
                              label=f"keras mlp c{connections}", **common)
                results.append(result)
                print(f"  c={connections}: {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
        # after the server is gone, so the two do not compete for the cores
        model_times = in_process(checkpoint, x, seconds=max(2.0, args.duration / 2))

    served = model_times["served call"]["p50_us"] / 1e3
    print()
    print_table(
        [[r.connections, r.rps, r.p50_ms, r.p99_ms, 1e3 / r.rps, 1e3 / r.rps - served, r.errors]
         for r in results],
        ["conns", "req/s", "p50 ms", "p99 ms", "ms/request", "not in the model ms/request", "errors"],
    )
    print()
    print_table(
        [[name, t["p50_us"] / 1e3, t["p99_us"] / 1e3, int(t["calls"])] for name, t in model_times.items()],
        ["in process (same checkpoint, 1x784)", "p50 ms", "p99 ms", "calls"],
    )
    if args.json:
        args.json.write_text(json.dumps(
            {"server": [r.as_dict() for r in results], "in_process": model_times}, indent=2))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
