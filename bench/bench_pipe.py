"""ModelPipe figures: I/O-bound workers, batching, and the cost of a composed pipe per item.

    .venv/bin/python bench/bench_pipe.py [--repeat 5]

1. An I/O-bound stage (sleep 10 ms per item), 8 workers, 200 items: wall time against the ideal
   200 x 10 ms / 8 = 250 ms.
2. A batched stage (batch_size=32, np.vstack) over 1000 items: calls against ceil(1000 / 32).
3. A pipe of three composed no-option functions against calling them directly: overhead per item.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np

from studio_plugins.model_util import ModelPipe


def best_of(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def io_bound(repeat: int) -> None:
    items, workers, delay = 200, 8, 0.010

    def fetch(x: int) -> int:
        time.sleep(delay)
        return x

    pipe = ModelPipe().add(fetch, num_workers=workers, timeout=5)
    data = list(range(items))
    assert pipe(data) == data
    wall = best_of(repeat, lambda: pipe(data))
    ideal = items * delay / workers
    print(f"I/O-bound stage: {items} items x {delay * 1000:.0f} ms, {workers} workers: "
          f"{wall * 1000:.0f} ms (ideal {ideal * 1000:.0f} ms, {wall / ideal:.2f}x)")


def batched(repeat: int) -> None:
    items, batch_size = 1000, 32
    calls: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch.sum(axis=1)

    pipe = ModelPipe().add(lambda x: np.full((1, 8), x, np.float32), num_workers=4)
    pipe.add(model, num_workers=1, batch_size=batch_size, batcher=np.vstack)
    data = list(range(items))
    wall = best_of(repeat, lambda: pipe(data))
    calls.clear()
    result = pipe(data)
    assert [float(r) for r in result] == [8.0 * x for x in data]
    print(f"batched stage: {items} items, batch_size {batch_size}: {len(calls)} calls "
          f"(ideal {math.ceil(items / batch_size)}; sizes {sorted(set(calls), reverse=True)}), "
          f"{wall * 1000:.1f} ms per call of the pipe")


def composed_overhead(repeat: int) -> None:
    items = 100_000
    funcs = [lambda x: x + 1, lambda x: x * 2, lambda x: x - 3]
    pipe = ModelPipe()
    for func in funcs:
        pipe.add(func)
    data = list(range(items))

    def direct() -> list[int]:
        return [funcs[2](funcs[1](funcs[0](x))) for x in data]

    assert pipe(data) == direct()
    piped = best_of(repeat, lambda: pipe(data))
    plain = best_of(repeat, direct)
    per_item = (piped - plain) / items * 1e6
    print(f"composed no-option pipe (3 functions, {items} items): {piped / items * 1e6:.2f} us/item "
          f"vs {plain / items * 1e6:.2f} us/item direct: overhead {per_item:.2f} us/item")


def workers_overhead(repeat: int) -> None:
    items = 10_000
    pipe = ModelPipe().add(lambda x: x, num_workers=32)
    data = list(range(items))
    wall = best_of(repeat, lambda: pipe(data))
    print(f"32-worker stage, trivial function, {items} items: {wall / items * 1e6:.1f} us/item "
          f"(scheduling and thread hand-off)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best is shown")
    args = parser.parse_args()
    started = time.perf_counter()
    io_bound(args.repeat)
    batched(args.repeat)
    composed_overhead(args.repeat)
    workers_overhead(args.repeat)
    print(f"(best of {args.repeat}; {time.perf_counter() - started:.1f} s in all)")


if __name__ == "__main__":
    main()
