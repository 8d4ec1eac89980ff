"""gRPC ModelInfer on two checkouts' servers, side by side: what a change costs per call.

Starts ``studio-plug serve`` on the identity model with ``--grpc-port`` twice, once from this
checkout and once from ``BASELINE`` (another checkout, e.g. ``git worktree add /tmp/old REV``;
its code is put first on the path), then loads each in turn with 16 ``grpc.aio`` callers
(bench_grpc.py's load generator, ``[1,10]`` FP32), the order alternating per round. Prints each
round's req/s and the server's CPU time per call, which outside load moves far less.

    python -m bench.bench_grpc_ab /tmp/old            # 4 rounds of 4 s
    python -m bench.bench_grpc_ab /tmp/old -r 6 -d 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_grpc import drive, infer_request, measure
from bench.bench_v2 import free_port
from bench.harness import SETTLE_SECONDS

KEY = "ident"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_grpc_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path, help="the other checkout")
    parser.add_argument("-r", "--rounds", type=int, default=4)
    parser.add_argument("-d", "--duration", type=float, default=4.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as home:
        (Path(home) / "experiments" / KEY / "modeldir").mkdir(parents=True)
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for label, checkout in (("baseline", args.baseline.resolve()), ("this", here)):
                port, grpc_port = free_port(), free_port()
                # run from the checkout with -m: its directory comes first on the path
                env = dict(os.environ, STUDIOML_HOME=home, PYTHONPATH=str(checkout))
                process = subprocess.Popen(
                    [sys.executable, "-m", "studio_plugins", "serve", KEY, "--port", str(port),
                     "--grpc-port", str(grpc_port), "--killafter", "0"],
                    cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                servers[label] = (process, f"127.0.0.1:{grpc_port}")
            time.sleep(SETTLE_SECONDS)  # started, and past the heap's refreeze
            request = infer_request(KEY, KEY, np.random.default_rng(0).random((1, 10), dtype=np.float32))
            results: dict[str, list[tuple[float, float]]] = {label: [] for label in servers}
            for round_ in range(args.rounds):
                for label in sorted(servers, reverse=round_ % 2 == 1):
                    process, target = servers[label]

                    def run(seconds: float, name: str, target: str = target) -> object:
                        return drive(target, request, concurrency=16, duration=seconds, label=name)

                    result = measure(run, warmup=args.warmup, duration=args.duration,
                                     pid=process.pid, label=label)
                    results[label].append((result.rps, result.cpu_us or float("nan")))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    for label, rows in results.items():
        print(f"{label:8} " + "  ".join(f"{rps:,.0f}/s {cpu:.0f} us" for rps, cpu in rows)
              + f"   median {statistics.median(cpu for _, cpu in rows):.0f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
