"""Decoding and encoding a request's pickle in one process: the fast path against the alternatives.

For each body (a dict of one array, as ``pickle.dumps`` writes it at protocols 4 and 5), side by
side in one run: ``restricted_loads`` (what the server does: core/fast_pickle.py, else the
restricted unpickler), the restricted unpickler alone, and plain ``pickle.loads`` (unsafe: the
floor); for replies, ``dumps`` (what the server does) against ``pickle.dumps``. Microseconds per
call, the best of ``--repeat`` timings of ``--number`` calls each.

    python -m bench.bench_codec
"""

from __future__ import annotations

import argparse
import pickle
import sys
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bench.harness import describe_machine, print_table
from core.safe_pickle import dumps, restricted_loads, unpickle_restricted


def micros(call: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_codec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure (the best is shown)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    payloads = {
        "10 float64": {"x": rng.random(10)},
        "1x784 float32": {"x": rng.random((1, 784), dtype=np.float32)},
        "1x64x64x3 uint8": {"x": rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)},
    }
    print(f"# bench_codec: {describe_machine()}; best of {args.repeat} x {args.number} calls, us per call")
    rows = []
    for name, payload in payloads.items():
        for protocol in (4, 5):
            body = pickle.dumps(payload, protocol=protocol)
            served = micros(partial(restricted_loads, body), args.number, args.repeat)
            unpickler = micros(partial(unpickle_restricted, body), args.number, args.repeat)
            plain = micros(partial(pickle.loads, body), args.number, args.repeat)
            rows.append([f"decode {name}, protocol {protocol}", served, unpickler, plain,
                         f"{unpickler / served:.2f}x"])
        ours = micros(partial(dumps, payload), args.number, args.repeat)
        theirs = micros(partial(pickle.dumps, payload, protocol=5), args.number, args.repeat)
        rows.append([f"encode {name}", ours, "-", theirs, f"{theirs / ours:.2f}x"])
    print_table(rows, ["body", "served us", "restricted unpickler us", "plain pickle us",
                       "speed-up"])
    print("\nserved: restricted_loads / dumps as the server runs them; speed-up: against the "
          "restricted unpickler (decode) or pickle.dumps (encode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
