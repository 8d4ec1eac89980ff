"""V2 over gRPC (``--grpc-port``) against MLServer 1.7's gRPC, and against our own HTTP, in one run.

Two parts:

1. ``ModelInfer`` on the identity model (``[1,10]`` FP32) and on the Keras MLP 784-256-10
   (``[1,784]`` FP32, bench/bench_keras.py's checkpoint), at 1 and 16 concurrent requests, to
   ``studio-plug serve ident --model mlp=mlp --grpc-port 0`` and to MLServer 1.7.1 serving the
   same two models with bench/bench_v2.py's runtimes (its venv, installed there on first use;
   skipped with a warning when it cannot be had). Each in the configurations of bench_v2.py
   (``--ours``, ``--mlserver``); the target compares the best of each at 16.
2. Our server, gRPC against HTTP (V2 binary tensor extension, wrk), on the identity model for
   the small input and a 1x224x224x3 FP32 one.

The load generator: Triton's ``perf_analyzer`` does not install here (PyPI has only a 0.1.0
placeholder of ``perf-analyzer``), so it is the documented asyncio client below (``drive``):
``grpc.aio``, one channel (one HTTP/2 connection, as wrk's one connection per request in
flight) per concurrent caller, each sending the next request as soon as its reply arrived
(closed loop, as perf_analyzer's ``--concurrency-range``). The request is one
``inference.ModelInferRequest`` with ``raw_input_contents`` (what ``tritonclient.grpc`` and
perf_analyzer send), serialized once; replies are counted as bytes, not parsed (one reply per
point is parsed and checked beforehand). It runs in this process; its own CPU per request is
shown, since on a small machine it competes with the server for the cores.

Servers are all started first and measured one at a time, the order rotated per round
(``--rounds``); the median round is shown, with each server's process-tree CPU per request.

    python -m bench.bench_grpc                        # 10 s per point after 3 s warm-up, 1 round
    python -m bench.bench_grpc -r 3                   # 3 interleaved rounds, median shown
    python -m bench.bench_grpc -d 3 -w 1              # quicker
    python -m bench.bench_grpc --ours default --mlserver default,in-process --skip-http
    python -m bench.bench_grpc --json out.json        # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_keras import write_mlp
from bench.bench_v2 import (
    DEFAULT_VENV,
    MLSERVER_CONFIGS,
    OCTET,
    OURS_CONFIGS,
    check_binary,
    ensure_mlserver,
    load_with_headers,
    median,
    mlserver,
    tree_cpu_seconds,
    v2_binary,
    write_mlserver_repository,
)
from bench.harness import Result, describe_machine, have_wrk, print_table, studio_server, warn

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL_TARGET = 1.5
"""Issue 17: ours >= 1.5x MLServer's gRPC req/s on both models at 16 concurrent requests (V2 JSON
over HTTP has its own, higher target in bench_v2)."""
GRPC_TARGET = 1.0
"""Informational: gRPC >= HTTP (binary) on our server; reported, not required."""


def pb2() -> Any:
    """The V2 messages, from the protos this project serves (plugins/protocols/grpc)."""
    from plugins.protocols.grpc import grpc_service_pb2

    return grpc_service_pb2


def infer_request(model: str, name: str, array: np.ndarray) -> bytes:
    """A serialized ``ModelInferRequest``: one FP32 input in ``raw_input_contents``."""
    messages = pb2()
    request = messages.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, "FP32"
    tensor.shape.extend(array.shape)
    request.raw_input_contents.append(array.astype("<f4").tobytes())
    return bytes(request.SerializeToString())


def output_shape(reply: bytes) -> list[int]:
    response = pb2().ModelInferResponse.FromString(reply)
    return list(response.outputs[0].shape)


# --- the load generator -----------------------------------------------------------------------

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


async def _one_call(target: str, request: bytes) -> bytes:
    import grpc

    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        return bytes(await channel.unary_unary(METHOD)(request, timeout=60))


def check_reply(target: str, request: bytes, shape: list[int]) -> None:
    """One call, its reply parsed: the server answers this request with an output of ``shape``."""
    got = output_shape(asyncio.run(_one_call(target, request)))
    if got != shape:
        raise RuntimeError(f"{target}: ModelInfer answered shape {got}, expected {shape}")


async def _drive(target: str, request: bytes, concurrency: int,
                 seconds: float) -> tuple[list[float], int, float]:
    import grpc

    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(concurrency)]
    try:
        for channel in channels:  # connected before the clock starts
            await asyncio.wait_for(channel.channel_ready(), 30)
        latencies: list[float] = []
        errors = 0
        start = time.perf_counter()
        end = start + seconds

        async def caller(channel: Any) -> None:
            nonlocal errors
            call = channel.unary_unary(METHOD)  # bytes in, bytes out: nothing parsed
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                try:
                    await call(request, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(caller(channel) for channel in channels))
        return latencies, errors, time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()


def drive(target: str, request: bytes, *, concurrency: int, duration: float, label: str) -> Result:
    """``concurrency`` callers, each on its own channel, calling back to back for ``duration``."""
    before = _own_cpu()
    latencies, errors, seconds = asyncio.run(_drive(target, request, concurrency, duration))
    cpu = _own_cpu() - before
    ordered = sorted(latencies) or [float("nan")]

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    result = Result(label, concurrency, len(latencies), seconds, len(latencies) / seconds,
                    percentile(0.5), percentile(0.9), percentile(0.99), errors, "grpc.aio")
    result.client_cpu_us = cpu / max(1, len(latencies)) * 1e6  # type: ignore[attr-defined]
    return result


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- running ----------------------------------------------------------------------------------


@dataclass
class Server:
    grpc: str
    """host:port of its gRPC service."""
    http: str | None
    pid: int | None


def measure(run: Any, *, warmup: float, duration: float, pid: int | None, label: str) -> Result:
    """Warm up, then one measured point; ``cpu_us``: the server's process tree per request."""
    if warmup > 0:
        run(warmup, "warm-up")
    before = tree_cpu_seconds(pid) if pid else None
    result: Result = run(duration, label)
    after = tree_cpu_seconds(pid) if pid else None
    if before is not None and after is not None and result.requests:
        result.cpu_us = (after - before) / result.requests * 1e6
    print(f"  {label}: {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
    return result


@contextlib.contextmanager
def mlserver_grpc(executable: Path, root: Path, checkpoint: Path, config: str) -> Iterator[Server]:
    port = write_mlserver_repository(root, checkpoint, *MLSERVER_CONFIGS[config])
    grpc_port = json.loads((root / "settings.json").read_text())["grpc_port"]
    with mlserver(executable, root, port) as process:
        yield Server(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{port}/", process.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_grpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=3.0, help="warm-up seconds per point")
    parser.add_argument("-r", "--rounds", type=int, default=1,
                        help="measure each point this many times, servers interleaved; the median is shown")
    parser.add_argument("-c", "--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--mlserver-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--ours", default=",".join(OURS_CONFIGS), help="our configurations to run")
    parser.add_argument("--mlserver", default=",".join(MLSERVER_CONFIGS),
                        help="MLServer configurations to run")
    parser.add_argument("--no-install", action="store_true", help="never install MLServer")
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument("--skip-http", action="store_true", help="leave out part 2 (gRPC vs HTTP)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = np.random.default_rng(0)
    small = rng.random((1, 10), dtype=np.float32)
    row = rng.random((1, 784), dtype=np.float32)
    image = rng.random((1, 224, 224, 3), dtype=np.float32)
    ours_configs = args.ours.split(",")
    mlserver_configs = [] if args.skip_mlserver else args.mlserver.split(",")
    print(f"# bench_grpc: {describe_machine()}; {args.duration:g}s per point after {args.warmup:g}s "
          f"warm-up, {args.rounds} round(s) with the servers interleaved (median shown); client: "
          "grpc.aio in this process, one channel per concurrent request (perf_analyzer does not "
          "install here)")
    for name in ours_configs:
        print(f"#   ours {name}: studio-plug serve ident --model mlp=mlp --grpc-port 0 "
              f"{' '.join(OURS_CONFIGS[name])}")
    for name in mlserver_configs:
        workers, batching = MLSERVER_CONFIGS[name]
        described = (f"max_batch_size={batching[0]}, max_batch_time={batching[1]}s" if batching
                     else "no batching")
        print(f"#   mlserver {name}: parallel_workers={workers}, {described}")

    samples: dict[tuple[str, str, str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="studio-bench-grpc-") as directory, \
            contextlib.ExitStack() as stack:
        home = Path(directory) / "studioml"
        (home / "experiments" / "ident" / "modeldir").mkdir(parents=True)
        modeldir = home / "experiments" / "mlp" / "modeldir"
        modeldir.mkdir(parents=True)
        checkpoint = write_mlp(modeldir)

        servers: dict[tuple[str, str], Server] = {}
        for config in ours_configs:
            ours = stack.enter_context(studio_server(
                "ident", "--model", "mlp=mlp", "--grpc-port", "0", *OURS_CONFIGS[config], home=home))
            servers["ours", config] = Server(ours.grpc_target, ours.url,
                                             ours.process.pid if ours.process else None)
        executable = ensure_mlserver(args.mlserver_venv, not args.no_install) if mlserver_configs else None
        for config in mlserver_configs:
            if executable is None:
                break
            try:
                servers["mlserver", config] = stack.enter_context(
                    mlserver_grpc(executable, Path(directory) / f"mlserver-{config}", checkpoint, config))
            except RuntimeError as exc:
                warn(f"MLServer ({config}) skipped: {exc}")

        # our MLP's input name, from its metadata; MLServer's runtime takes its first input
        mlp_input = _input_name(servers["ours", ours_configs[0]].grpc, "mlp")
        requests = {"ident": ("x", small), "mlp": (mlp_input, row)}
        for server in servers.values():
            for model, (input_name, array) in requests.items():
                check_reply(server.grpc, infer_request(model, input_name, array), [1, 10])
        order = list(servers)
        for model, (input_name, array) in requests.items():
            request = infer_request(model, input_name, array)
            for level in levels:
                for round_ in range(args.rounds):
                    for name, config in order[round_ % len(order):] + order[:round_ % len(order)]:
                        server = servers[name, config]
                        label = f"{name} {config} {model} c{level}"

                        def run(seconds: float, label: str, target: str = server.grpc,
                                request: bytes = request, level: int = level) -> Result:
                            return drive(target, request, concurrency=level, duration=seconds,
                                         label=label)

                        samples.setdefault((name, config, model, level), []).append(measure(
                            run, warmup=args.warmup, duration=args.duration, pid=server.pid,
                            label=label))

        if not args.skip_http:
            if not have_wrk():
                warn("part 2 (gRPC vs HTTP) needs wrk (apt-get install -y wrk): skipped")
            else:
                _grpc_against_http(servers["ours", ours_configs[0]], {"small": small, "large": image},
                                   levels, args, samples)

    points: dict[str, dict[tuple[str, str, int], Result]] = {"ours": {}, "mlserver": {}, "http": {}}
    for (group, config, model, level), results in samples.items():
        points[group][config, model, level] = median(results)
    return report(points, levels, args.json)


def _input_name(target: str, model: str) -> str:
    import grpc

    async def ask() -> bytes:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
            request = pb2().ModelMetadataRequest(name=model).SerializeToString()
            return bytes(await call(request, timeout=30))

    return str(pb2().ModelMetadataResponse.FromString(asyncio.run(ask())).inputs[0].name)


def _grpc_against_http(ours: Server, inputs: dict[str, np.ndarray], levels: list[int],
                       args: argparse.Namespace,
                       samples: dict[tuple[str, str, str, int], list[Result]]) -> None:
    """Our identity model over gRPC (raw tensors) and over HTTP (V2 binary extension, wrk)."""
    assert ours.http is not None
    url = f"{ours.http}v2/models/ident/infer"
    for size, array in inputs.items():
        request = infer_request("ident", "x", array)
        check_reply(ours.grpc, request, list(array.shape))
        body, header_length = v2_binary("x", array)
        check_binary(url, body, header_length, array.nbytes)
        headers = {"Inference-Header-Content-Length": str(header_length)}

        def over_grpc(seconds: float, label: str, request: bytes = request, level: int = 1) -> Result:
            return drive(ours.grpc, request, concurrency=level, duration=seconds, label=label)

        def over_http(seconds: float, label: str, body: bytes = body, level: int = 1,
                      headers: dict[str, str] = headers) -> Result:
            return load_with_headers(url, body, OCTET, headers, connections=level, duration=seconds,
                                     label=label)

        modes = [("grpc", over_grpc), ("http", over_http)]
        for level in levels:
            for round_ in range(args.rounds):
                for mode, run in modes[round_ % 2:] + modes[:round_ % 2]:
                    def at_level(seconds: float, label: str, run: Any = run, level: int = level) -> Result:
                        return run(seconds, label, level=level)

                    samples.setdefault(("http", mode, size, level), []).append(measure(
                        at_level, warmup=args.warmup, duration=args.duration, pid=ours.pid,
                        label=f"ours {size} {mode} c{level}"))


def _best(points: dict[tuple[str, str, int], Result], model: str, level: int) -> tuple[str, Result] | None:
    found = [(config, r) for (config, m, c), r in points.items() if (m, c) == (model, level)]
    return max(found, key=lambda pair: pair[1].rps) if found else None


def _client_cpu(result: Result) -> float:
    return float(getattr(result, "client_cpu_us", float("nan")))


def report(points: dict[str, dict[tuple[str, str, int], Result]], levels: list[int],
           json_path: Path | None) -> int:
    ours, theirs, http = points["ours"], points["mlserver"], points["http"]
    print()
    print("V2 over gRPC (ModelInfer, raw tensors), ours vs MLServer 1.7.1 (server cpu: its process "
          "tree per request; client cpu: the load generator's)")
    rows = []
    for model in ("ident", "mlp"):
        for level in levels:
            for server, group in (("mlserver", theirs), ("ours", ours)):
                for (config, m, c), r in group.items():
                    if (m, c) != (model, level):
                        continue
                    other = theirs.get((config, m, c)) if server == "ours" else None
                    rows.append([model, level, f"{server} {config}", r.rps, r.p50_ms, r.p99_ms,
                                 r.cpu_us or float("nan"), _client_cpu(r), r.errors,
                                 f"{r.rps / other.rps:.2f}x" if other else ""])
    print_table(rows, ["model", "conc", "server", "req/s", "p50 ms", "p99 ms", "server cpu us/req",
                       "client cpu us/req", "errors", "ours/mlserver same config"])
    if http:
        print()
        print("Our server, gRPC (raw tensors) vs HTTP (V2 binary extension, wrk), identity model: "
              "small [1,10] and large [1,224,224,3] FP32")
        rows = []
        for size in ("small", "large"):
            for level in levels:
                grpc_point, http_point = http.get(("grpc", size, level)), http.get(("http", size, level))
                for mode, point in (("http", http_point), ("grpc", grpc_point)):
                    if point is None:
                        continue
                    r = point
                    ratio = (f"{r.rps / http_point.rps:.2f}x" if mode == "grpc" and http_point else "")
                    rows.append([size, level, mode, r.rps, r.p50_ms, r.p99_ms,
                                 r.cpu_us or float("nan"), r.errors, ratio])
        print_table(rows, ["input", "conc", "protocol", "req/s", "p50 ms", "p99 ms",
                           "server cpu us/req", "errors", "grpc/http"])
    print()
    top = max(levels)
    failed = False
    for model in ("ident", "mlp"):
        mine, best_other = _best(ours, model, top), _best(theirs, model, top)
        if mine is None or best_other is None:
            print(f"target ours >= {MODEL_TARGET}x MLServer gRPC ({model}, c{top}): not measured")
            continue
        speedup = mine[1].rps / best_other[1].rps
        failed |= speedup < MODEL_TARGET
        print(f"target ours >= {MODEL_TARGET}x MLServer gRPC ({model}, c{top}, best of each: ours "
              f"{mine[0]}, mlserver {best_other[0]}): {speedup:.2f}x "
              f"{'met' if speedup >= MODEL_TARGET else 'NOT met'}")
    for size in ("small", "large"):
        grpc_point, http_point = http.get(("grpc", size, top)), http.get(("http", size, top))
        if grpc_point and http_point:
            print(f"gRPC / HTTP on our server ({size}, c{top}): {grpc_point.rps / http_point.rps:.2f}x")
    if json_path:
        json_path.write_text(json.dumps({
            name: [{**r.as_dict(), "config": config, "model": model,
                    "client_cpu_us": _client_cpu(r)} for (config, model, _), r in group.items()]
            for name, group in points.items()
        }, indent=2))
    errors = any(r.errors for group in points.values() for r in group.values())
    return 1 if errors or failed else 0


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.exit(main())
