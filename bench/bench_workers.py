"""``--workers N``: memory (PSS) and throughput of 1, 2 and 4 forked workers, side by side.

Memory. For the Keras MLP 784-256-10 and a TorchScript stack of 4096x4096 fp32 Linear layers
(128 MiB of weights by default), each served by

- ``studio-plug serve --workers N`` (the model loaded once in the parent, N workers forked), and
- N separately started single-process servers of the same model (what reloading per worker costs),

after every server answered requests (so workers have run the model on their copy-on-write
pages), the PSS of the whole process tree (parent + workers) is summed from
``/proc/PID/smaps_rollup``. PSS divides each shared page among the processes that map it, so the
sums add up to what the servers really cost. ``anon`` is the anonymous part (heap, weights):
library code is also shared between separately started processes — and with any other process on
the machine that maps the same libraries, so PSS moves a little with what else runs; ``anon``
does not. The separate servers are started together, measured at 4, then stopped one by one and
measured at 2 and 1. Target: 4 workers at most 1.5x the PSS of one.

Throughput. wrk at 64 connections, a pickled ``{"x": 1x784 float32}``, against the Keras MLP with
1, 2 and 4 workers (median of 3 rounds); ``cpu us/req`` is the CPU time of the whole server tree
per request. Workers beyond the number of cores cannot add throughput (and wrk needs a core too):
the core count is printed beside the figures. ``--workers 1`` is the plain single-process server.

    python -m bench.bench_workers                        # everything (~3-4 min on 2 cores)
    python -m bench.bench_workers --only memory          # or: --only throughput
    python -m bench.bench_workers -d 3 -w 1 --json out.json

The server freezes its heap (``gc.freeze()``) before each fork, so the workers' garbage
collector leaves the objects inherited from the parent, and their pages, alone.

Every server started is stopped again, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from bench.bench_keras import write_mlp
from bench.harness import (
    check_echo,
    describe_machine,
    load,
    print_table,
    studio_server,
    warn,
)
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess

PICKLE = "application/python-pickle"
MLP, TORCH = "mlp", "big"
TARGET = 1.5  # 4 workers at most this many times the PSS of one
WARM_REQUESTS = 40  # per worker, before memory is read


# --- models -----------------------------------------------------------------------------------


def write_torch(modeldir: Path, layers: int, width: int) -> int:
    """A TorchScript ``Sequential`` of ``layers`` Linear(width, width) + ReLU; its weight bytes."""
    import torch

    torch.manual_seed(0)
    parts: list[torch.nn.Module] = []
    for _ in range(layers):
        parts += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    module = torch.nn.Sequential(*parts[:-1]).eval()
    torch.jit.save(torch.jit.script(module), str(modeldir / "big.pt"))
    return sum(p.numel() * p.element_size() for p in module.parameters())


# --- process trees and their memory -----------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (index 0 is the state)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and int(fields[1]) == parent:
            found.append(int(entry.name))
    return sorted(found)


def tree(parent: int) -> list[int]:
    return [parent, *children(parent)]


def identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a pid that was reused by another process no longer matches."""
    fields = _stat(pid)
    return (pid, fields[19]) if fields else None


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = 0
    for pid in pids:
        if fields := _stat(pid):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Memory:
    """Summed over a set of processes, in MiB."""

    processes: int
    pss: float
    pss_anon: float
    rss: float

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.processes + other.processes, self.pss + other.pss,
                      self.pss_anon + other.pss_anon, self.rss + other.rss)


def memory(pids: Sequence[int]) -> Memory:
    total = {"Pss:": 0, "Pss_Anon:": 0, "Rss:": 0}
    for pid in pids:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        for line in text.splitlines():
            name, _, rest = line.partition(" ")
            if name in total:
                total[name] += int(rest.split()[0])  # kB
    return Memory(len(pids), total["Pss:"] / 1024, total["Pss_Anon:"] / 1024, total["Rss:"] / 1024)


# --- servers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(count: int, key: str, home: Path, *args: str,
            env: dict[str, str] | None = None) -> Iterator[list[ServerProcess]]:
    """``count`` servers of ``key``, started together; on the way out every one is stopped, and
    any of its workers still alive after that (a parent that had to be killed) is killed too."""
    leftovers: list[tuple[int, str]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_kill_leftovers, leftovers)
        managers = [studio_server(key, *args, home=home, env=env) for _ in range(count)]
        pool = ThreadPoolExecutor(count)
        try:
            futures = [pool.submit(stack.enter_context, manager) for manager in managers]
        finally:
            # also on Ctrl-C: every server a thread is starting gets onto the stack before it unwinds
            pool.shutdown(wait=True, cancel_futures=True)
        started = [future.result() for future in futures]
        for server in started:
            assert server.process is not None
            leftovers += filter(None, map(identity, children(server.process.pid)))
        yield started


def _kill_leftovers(processes: list[tuple[int, str]]) -> None:
    for pid, started in processes:
        if identity(pid) == (pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                warn(f"killed worker {pid}, left running after its parent stopped")


def parent_pid(server: ServerProcess) -> int:
    assert server.process is not None
    return server.process.pid


def warm(server: ServerProcess, data: dict[str, np.ndarray], workers: int) -> None:
    """Enough concurrent requests that every worker runs the model (and touches its weights)."""
    with ThreadPoolExecutor(4 * workers) as pool:
        list(pool.map(lambda _: predict(server.url, data, timeout=60), range(WARM_REQUESTS * workers)))


# --- memory -----------------------------------------------------------------------------------


@dataclass
class MemoryRow:
    model: str
    n: int
    workers: Memory
    separate: Memory


def measure_memory(model: str, key: str, home: Path, data: dict[str, np.ndarray],
                   counts: Sequence[int], env: dict[str, str] | None) -> list[MemoryRow]:
    forked: dict[int, Memory] = {}
    for n in counts:
        with servers(1, key, home, "--workers", str(n), env=env) as (server,):
            warm(server, data, n)
            pids = tree(parent_pid(server))
            if len(pids) != (n + 1 if n > 1 else 1):
                raise RuntimeError(f"--workers {n}: expected {n} workers, found {len(pids) - 1}")
            forked[n] = memory(pids)
        print(f"  {model}: --workers {n}: {forked[n].pss:,.0f} MiB PSS", file=sys.stderr, flush=True)

    separate: dict[int, Memory] = {}
    with servers(max(counts), key, home, env=env) as running:
        for server in running:
            warm(server, data, 1)
        # PSS is shared out among the processes alive now: measure at the largest count, then
        # stop servers one by one and measure what is left
        for n in sorted(counts, reverse=True):
            while len(running) > n:
                running.pop().stop()
            separate[n] = sum((memory(tree(parent_pid(s))) for s in running), Memory(0, 0, 0, 0))
            print(f"  {model}: {n} separate: {separate[n].pss:,.0f} MiB PSS", file=sys.stderr, flush=True)
    return [MemoryRow(model, n, forked[n], separate[n]) for n in counts]


def print_memory(rows: list[MemoryRow]) -> list[tuple[str, float]]:
    """The table; returns (model, PSS of the most workers / PSS of one) per model."""
    ones = {row.model: row for row in rows if row.n == 1}
    table = []
    ratios = []
    for row in rows:
        one = ones.get(row.model)
        vs_one = row.workers.pss / one.workers.pss if one else float("nan")
        table.append([row.model, row.n, row.workers.processes, row.workers.pss, row.workers.pss_anon,
                      f"{vs_one:.2f}x", row.separate.pss, row.separate.pss_anon,
                      f"{row.separate.pss / row.workers.pss:.2f}x"])
        if one and row.n == max(r.n for r in rows if r.model == row.model) and row.n > 1:
            ratios.append((f"{row.model}, {row.n} workers", vs_one))
    print_table(table, ["model", "N", "procs", "workers PSS MiB", "anon MiB", "vs 1 worker",
                        "N separate PSS MiB", "anon MiB", "separate/workers"])
    return ratios


# --- throughput -------------------------------------------------------------------------------


def measure_throughput(home: Path, body: bytes, counts: Sequence[int], connections: int,
                       duration: float, warmup: float, rounds: int, client: str,
                       env: dict[str, str] | None) -> list[dict[str, Any]]:
    """The median round (by req/s) per worker count. One server per count, all started first;
    each round visits them in turn, in the opposite order from the round before, so that
    outside load on the machine falls on every count alike."""
    measured: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with contextlib.ExitStack() as stack:
        running = {n: stack.enter_context(servers(1, MLP, home, "--workers", str(n), env=env))[0]
                   for n in counts}
        for server in running.values():
            check_echo(server.url, body, PICKLE, lambda reply: pickle.loads(reply)["x"].shape == (1, 10))
        for round_ in range(rounds):
            for n in counts if round_ % 2 == 0 else reversed(counts):
                server = running[n]
                if warmup > 0:
                    load(server.url, body, PICKLE, connections=connections, duration=warmup, client=client)
                pids = tree(parent_pid(server))
                cpu_before = cpu_seconds(pids)
                result = load(server.url, body, PICKLE, connections=connections, duration=duration,
                              client=client, label=f"mlp --workers {n}")
                cpu = cpu_seconds(pids) - cpu_before
                measured[n].append({"workers": n, **result.as_dict(),
                                    "cpu_us": cpu / result.requests * 1e6 if result.requests else None})
                print(f"  mlp --workers {n}, round {round_ + 1}: {result.rps:,.0f} req/s",
                      file=sys.stderr, flush=True)
    return [sorted(measured[n], key=lambda r: r["rps"])[(rounds - 1) // 2] for n in counts]


def print_throughput(results: list[dict[str, Any]]) -> None:
    one = next((r["rps"] for r in results if r["workers"] == 1), None)
    print_table(
        [[r["workers"], r["rps"], f"{r['rps'] / one:.2f}x" if one else "-", r["p50_ms"], r["p99_ms"],
          r["cpu_us"] if r["cpu_us"] is not None else "-", r["errors"]] for r in results],
        ["workers", "req/s", "vs 1", "p50 ms", "p99 ms", "cpu us/req", "errors"],
    )


# --- main -------------------------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the with-blocks, which stop every server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--only", choices=("memory", "throughput"), default=None)
    parser.add_argument("--torch-layers", type=int, default=2,
                        help="Linear(4096, 4096) layers of the torch model (64 MiB each)")
    parser.add_argument("-d", "--duration", type=float, default=8.0, help="seconds per throughput point")
    parser.add_argument("-w", "--warmup", type=float, default=2.0, help="warm-up seconds per point")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="throughput rounds (median shown)")
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    counts = sorted({int(n) for n in args.workers.split(",")})
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    cores = len(os.sched_getaffinity(0))
    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    body = pickle.dumps({"x": x}, protocol=5)
    print(f"# bench_workers: {describe_machine()}; {cores} usable cores; workers {counts}")
    began = time.monotonic()
    out: dict[str, Any] = {"cores": cores}
    with tempfile.TemporaryDirectory(prefix="studio-bench-workers-") as directory:
        home = Path(directory)
        for key in (MLP, TORCH):
            (home / "experiments" / key / "modeldir").mkdir(parents=True)
        write_mlp(home / "experiments" / MLP / "modeldir")
        env = None
        if args.only != "throughput":
            width = 4096
            weights = write_torch(home / "experiments" / TORCH / "modeldir", args.torch_layers, width)
            torch_input = np.random.default_rng(0).random((1, width), dtype=np.float32)
            rows = measure_memory("keras mlp", MLP, home, {"x": x}, counts, env)
            rows += measure_memory(f"torch {weights / 2**20:.0f}MiB", TORCH, home,
                                   {"input": torch_input}, counts, env)
            out["memory"] = [asdict(row) for row in rows]
        if args.only != "memory":
            out["throughput"] = measure_throughput(home, body, counts, args.connections,
                                                   args.duration, args.warmup, args.rounds, args.client,
                                                   env)

    status = 0
    if "memory" in out:
        print(f"\nMemory: PSS summed over each server's processes (parent + workers), after "
              f"{WARM_REQUESTS}xN requests; 'N separate' = N single-process servers of the same model")
        ratios = print_memory(rows)
        for label, ratio in ratios:
            met = ratio <= TARGET
            status |= not met
            print(f"target (<= {TARGET}x the PSS of one worker): {label}: {ratio:.2f}x "
                  f"{'met' if met else 'MISSED'}")
    if "throughput" in out:
        print(f"\nThroughput: keras mlp, pickled 1x784 float32 ({len(body):,} B), {args.connections} "
              f"connections, median of {args.rounds} rounds of {args.duration:g}s after {args.warmup:g}s "
              f"warm-up; {cores} usable cores "
              f"(more workers than cores cannot add throughput)")
        print_throughput(out["throughput"])
        status |= any(r["errors"] for r in out["throughput"])
    print(f"\n({time.monotonic() - began:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every server was stopped", file=sys.stderr)
        sys.exit(130)
