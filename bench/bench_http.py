"""HTTP overhead of `studio-plug serve` against a raw ASGI echo app on the same Hypercorn (the floor).

The identity model answers what it is sent, so the difference to the floor is our request path:
routing, body reading, decoding the pickle (core/wire/fast_pickle.py, else the restricted unpickler),
the data plane and pickling the reply. Bodies are pickled dicts: small ``{"x": 10 float64}`` and
large ``{"x": 1x224x224x3 float32}``; each at 1 and 16 connections. Target: ours >= 0.90 of the
floor in req/s for small bodies at 16 connections (issue 18).

    python -m bench.bench_http                    # 3 rounds of 10 s per point, after a 3 s warm-up
    python -m bench.bench_http -d 3 -w 1 -r 1     # quicker
    python -m bench.bench_http --json out.json    # also write every figure as JSON
    python -m bench.bench_http --baseline /tmp/main   # and another checkout's code, side by side
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
from functools import partial
from pathlib import Path

import numpy as np

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
TARGET = 0.90  # issue 18 (0.80 before)


def bodies() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "small": pickle.dumps({"x": rng.random(10)}, protocol=5),
        "large": pickle.dumps({"x": rng.random((1, 224, 224, 3), dtype=np.float32)}, protocol=5),
    }


def _same_x(expected: np.ndarray, reply: bytes) -> bool:
    return bool(np.array_equal(pickle.loads(reply)["x"], expected))


def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda result: result.rps)[len(results) // 2]


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "-" if not numerator or not denominator else f"{numerator / denominator:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_http", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=3.0, help="warm-up seconds per point")
    parser.add_argument("-c", "--connections", default="1,16", help="comma-separated")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("-r", "--rounds", type=int, default=3,
                        help="measurements per point and server, alternating; the median is shown")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra `studio-plug serve` argument (repeat; e.g. --serve-arg=--no-metrics)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for both servers (repeat; e.g. glibc's "
                        "MALLOC_TRIM_THRESHOLD_=268435456)")
    parser.add_argument("--only", choices=("small", "large"), default=None)
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also serve another checkout's code (e.g. `git archive main | tar -x -C DIR`), "
                        "measured in the same rounds: its rows say 'baseline'")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    connection_counts = [int(c) for c in args.connections.split(",")]
    payloads = {k: v for k, v in bodies().items() if args.only in (None, k)}

    print(f"# bench_http: {describe_machine()}; {args.duration:g}s per point after {args.warmup:g}s "
          f"warm-up, {args.rounds} round(s) each, median shown; load average {load_average()}")
    if args.serve_arg:
        print(f"# studio-plug serve bench {' '.join(args.serve_arg)}")
    if args.server_env:
        print(f"# server environment: {' '.join(args.server_env)}")
    results: list[tuple[str, Result, Result]] = []
    server_env = dict(item.split("=", 1) for item in args.server_env)
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(studio_server("bench", *args.serve_arg, env=server_env))
        floor = stack.enter_context(asgi_server("bench.harness:echo_app", env=server_env))
        studios = {"studio": ours}
        if args.baseline:
            studios["baseline"] = stack.enter_context(studio_server(
                "bench", *args.serve_arg, env={**server_env, "PYTHONPATH": str(args.baseline.resolve())}))
        for name, body in payloads.items():
            # identity: the reply is the same dict (re-pickled), so only its decoding is checked
            expected = pickle.loads(body)["x"]
            for studio in studios.values():
                check_echo(studio.url, body, PICKLE, partial(_same_x, expected))
            check_echo(floor.url, body, PICKLE, body.__eq__)
            for connections in connection_counts:
                servers = {"floor": floor, **studios}
                common = dict(connections=connections, client=args.client, threads=args.threads)
                if args.warmup > 0:
                    for server in servers.values():
                        load(server.url, body, PICKLE, duration=args.warmup, **common)
                runs: dict[str, list[Result]] = {label: [] for label in servers}
                for round_ in range(args.rounds):
                    # alternate who goes first: a neighbour's load then hits both alike
                    order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                    for label in order:
                        server = servers[label]
                        runs[label].append(load(server.url, body, PICKLE, duration=args.duration,
                                                label=f"{label} {name} c{connections}",
                                                pid=server.process.pid if server.process else None,
                                                **common))
                point = {label: median(done) for label, done in runs.items()}
                results.append((f"{name} ({len(body):,} B)", point["studio"], point["floor"]))
                if "baseline" in point:
                    results.append((f"{name}, baseline", point["baseline"], point["floor"]))
                spread = {label: ", ".join(f"{r.rps:,.0f}" for r in done) for label, done in runs.items()}
                print(f"  {name} c={connections}: " + ", ".join(f"{label} [{spread[label]}] req/s"
                                                                 for label in servers),
                      file=sys.stderr, flush=True)
    print(f"# load average after: {load_average()}")

    rows = []
    for body_name, ours_result, floor_result in results:
        rows.append([
            body_name, ours_result.connections,
            ours_result.rps, ours_result.p50_ms, ours_result.p99_ms,
            floor_result.rps, floor_result.p50_ms, floor_result.p99_ms,
            f"{ours_result.rps / floor_result.rps:.2f}",
            _cpu(ours_result.cpu_us), _cpu(floor_result.cpu_us),
            _ratio(floor_result.cpu_us, ours_result.cpu_us),
            ours_result.errors + floor_result.errors,
        ])
    print()
    print_table(rows, ["body", "conns", "ours req/s", "ours p50 ms", "ours p99 ms",
                       "floor req/s", "floor p50 ms", "floor p99 ms", "ours/floor",
                       "ours cpu us/req", "floor cpu us/req", "floor/ours cpu", "errors"])
    print("\nours/floor: req/s ratio. floor/ours cpu: the same ratio from the servers' CPU time per "
          "request,\nwhich other load on the machine hardly disturbs (1.00: no overhead over the floor).")
    verdict = 0
    for body_name, ours_result, floor_result in results:
        if body_name.startswith("small") and ours_result.connections == 16:
            ratio = ours_result.rps / floor_result.rps
            if "baseline" in body_name:
                print(f"\nbaseline (small, 16 connections): ours/floor = {ratio:.2f}, cpu "
                      f"{_ratio(floor_result.cpu_us, ours_result.cpu_us)}")
                continue
            met = ratio >= TARGET
            print(f"\ntarget (small, 16 connections): ours/floor = {ratio:.2f} "
                  f"{'>=' if met else '<'} {TARGET:.2f} -> {'met' if met else 'MISSED'}")
    if any(r.errors for _, o, f in results for r in (o, f)):
        print("some requests failed (see the errors column)")
        verdict = 1
    if args.json:
        args.json.write_text(json.dumps(
            [{"body": b, "ours": o.as_dict(), "floor": f.as_dict()} for b, o, f in results], indent=2
        ))
    return verdict


if __name__ == "__main__":
    sys.exit(main())
