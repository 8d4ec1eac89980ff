"""Batching across requests, measured: the Keras MLP (784-256-10) at 16 connections with
``--max-batch-size 16 --max-batch-delay 2`` against the same server without batching, side by
side in one run (each point measured ``--rounds`` times, alternating which server goes first;
medians shown). Also the identity model against the raw Hypercorn floor with metrics on, to show
what the data plane costs (the figure of bench_http.py, re-run here).

    python -m bench.bench_batching                # 3 rounds x 10 s per point
    python -m bench.bench_batching -d 3 -r 1      # quicker

Targets (issue: production data plane): batched >= 3x the unbatched req/s with p99 no worse;
identity >= 0.75 of the floor's req/s for small bodies at 16 connections.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.bench_keras import KEY, write_mlp
from bench.harness import (
    Result,
    asgi_server,
    check_echo,
    describe_machine,
    load,
    print_table,
    studio_server,
)

PICKLE = "application/python-pickle"
ECHO_APP = "bench.harness:echo_app"


def median_result(results: list[Result]) -> Result:
    """The round with the median req/s (its latencies travel with it)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


@contextlib.contextmanager
def mlp_home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="studio-bench-batching-") as directory:
        home = Path(directory)
        modeldir = home / "experiments" / KEY / "modeldir"
        modeldir.mkdir(parents=True)
        write_mlp(modeldir)
        yield home


def measure(servers: dict[str, str], body: bytes, connections: int, args: argparse.Namespace,
            pids: dict[str, int]) -> dict[str, Result]:
    """Each server ``rounds`` times, alternating the order; the median round of each."""
    runs: dict[str, list[Result]] = {name: [] for name in servers}
    names = list(servers)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            if args.warmup > 0:
                load(servers[name], body, PICKLE, connections=connections, duration=args.warmup)
            result = load(servers[name], body, PICKLE, connections=connections,
                          duration=args.duration, label=f"{name} c{connections}", pid=pids[name])
            runs[name].append(result)
            print(f"  {name} c={connections} round {round_index + 1}: {result.rps:,.0f} req/s",
                  file=sys.stderr, flush=True)
    return {name: median_result(results) for name, results in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=2.0, help="warm-up seconds per point")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-c", "--connections", type=int, default=16)
    args = parser.parse_args(argv)

    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    mlp_body = pickle.dumps({"x": x}, protocol=5)
    small_body = pickle.dumps({"x": np.arange(10, dtype=np.float64)}, protocol=5)
    print(f"# bench_batching: {describe_machine()}; {args.rounds} rounds x {args.duration:g}s "
          f"per point, {args.connections} connections, medians")

    with mlp_home() as home, \
            studio_server(KEY, home=home) as plain, \
            studio_server(KEY, "--max-batch-size", "16", "--max-batch-delay", "2",
                          home=home) as batched:
        for server in (plain, batched):
            check_echo(server.url, mlp_body, PICKLE,
                       lambda reply: pickle.loads(reply)["x"].shape == (1, 10))
        mlp = measure({"unbatched": plain.url, "batched": batched.url}, mlp_body,
                      args.connections, args,
                      {"unbatched": plain.process.pid, "batched": batched.process.pid})

    with studio_server("bench") as ours, asgi_server(ECHO_APP) as floor:
        check_echo(ours.url, small_body, PICKLE)
        identity = measure({"ours (metrics on)": ours.url, "raw ASGI floor": floor.url},
                           small_body, args.connections, args,
                           {"ours (metrics on)": ours.process.pid,
                            "raw ASGI floor": floor.process.pid})

    print()
    print_table(
        [[name, r.rps, r.p50_ms, r.p99_ms, r.cpu_us, r.errors] for name, r in mlp.items()],
        ["Keras MLP, 1x784 float32", "req/s", "p50 ms", "p99 ms", "cpu us/req", "errors"],
    )
    speedup = mlp["batched"].rps / mlp["unbatched"].rps
    p99_ok = mlp["batched"].p99_ms <= mlp["unbatched"].p99_ms
    print(f"batched / unbatched req/s: {speedup:.2f}x (target >= 3x: "
          f"{'met' if speedup >= 3 else 'MISSED'}); p99 {mlp['batched'].p99_ms:.1f} ms vs "
          f"{mlp['unbatched'].p99_ms:.1f} ms ({'no worse' if p99_ok else 'WORSE'})")
    print()
    print_table(
        [[name, r.rps, r.p50_ms, r.p99_ms, r.cpu_us, r.errors] for name, r in identity.items()],
        ["identity, small pickle (10 float64)", "req/s", "p50 ms", "p99 ms", "cpu us/req", "errors"],
    )
    ratio = identity["ours (metrics on)"].rps / identity["raw ASGI floor"].rps
    print(f"ours / floor req/s: {ratio:.2f} (target >= 0.75: {'met' if ratio >= 0.75 else 'MISSED'})")
    errors = sum(r.errors for r in [*mlp.values(), *identity.values()])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
