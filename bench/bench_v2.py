"""The Open Inference Protocol (V2) on `studio-plug serve` against MLServer 1.7, side by side.

Three parts, in one run:

1. V2 JSON on the identity model (``[1,10]`` FP32) and on the Keras MLP 784-256-10 (``[1,784]``
   FP32, the checkpoint of bench/bench_keras.py), at 1 and 16 connections, on our server;
2. the same requests to MLServer 1.7.1 serving the same two models (custom runtimes written
   here: the identity decodes and re-encodes with MLServer's NumpyCodec; the Keras one loads the
   same .keras file with Keras on the torch backend and calls it under ``torch.inference_mode``,
   as our loader does). MLServer runs in its own venv (default ``~/.cache/studio-bench/
   mlserver-1.7.1``, created and installed on first use: ``mlserver==1.7.1 'uvloop<0.22'`` —
   1.7.1 with uvloop >= 0.22 fails to start its worker — ``torch==2.13.0`` (pinned: an unpinned
   torch pulls GBs of CUDA), keras, h5py), with ``debug`` off. If it cannot be installed or
   started, it is skipped with a warning.

   Each server runs in a few configurations (``OURS_CONFIGS``, ``MLSERVER_CONFIGS``). Ours: its
   defaults; batching across requests (``--threads 2 --max-batch-size 16 --max-batch-delay 2``);
   two worker processes (``--workers 2``). MLServer: its defaults (``parallel_workers=1``:
   inference in a worker process); in process (``parallel_workers=0``); in process with its
   adaptive batching (``max_batch_size=16, max_batch_time=0.002``). The table shows each, with
   ours against MLServer's configuration of the same name; the targets compare ours with its
   defaults against MLServer's best configuration at 16 connections;
3. V2 binary tensor extension against V2 JSON for a 1x224x224x3 FP32 input on our identity model.

Beside them runs the ceiling: bench_http's raw ASGI echo on the same Hypercorn, sent the same
bodies (it returns each as it came). No app served by this Hypercorn answers faster, so the line
under each target says how far the target is from what the server under us allows at all.

All servers are started first and then loaded one at a time (an idle server costs nothing), with
the order rotated per round (``--rounds``), so outside load on the machine falls on all of them
alike; the median round is shown, with each server's CPU time per request (which outside load
moves far less than req/s). wrk runs one thread.
Targets: ours (defaults) >= 2.0x the req/s of MLServer's best configuration on both models at 16
connections (issue 18); binary >= 5x JSON's req/s on the large input. The last lines say whether
each was met.

    python -m bench.bench_v2                          # 10 s per point after a 3 s warm-up, 1 round
    python -m bench.bench_v2 -r 3                     # 3 interleaved rounds, median shown
    python -m bench.bench_v2 -d 3 -w 1                # quicker
    python -m bench.bench_v2 --ours default --mlserver default,in-process   # one process each
    python -m bench.bench_v2 --json out.json          # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_keras import write_mlp
from bench.harness import (
    LUA_SCRIPT,
    Result,
    asgi_server,
    bench_env,
    check_echo,
    describe_machine,
    have_wrk,
    load,
    print_table,
    process_cpu_seconds,
    studio_server,
    warn,
)

JSON = "application/json"
OCTET = "application/octet-stream"
MLSERVER_SPEC = ("mlserver==1.7.1", "uvloop<0.22", "torch==2.13.0", "keras>=3.0", "h5py")
DEFAULT_VENV = Path.home() / ".cache" / "studio-bench" / "mlserver-1.7.1"
MODEL_TARGET = 2.0
"""Issue 18: ours with its defaults against MLServer's best configuration, on both models."""
BINARY_TARGET = 5.0

RUNTIMES = '''
"""MLServer runtimes for bench/bench_v2.py: the identity model and a Keras model."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class Identity(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = [NumpyCodec.encode_output(i.name, NumpyCodec.decode_input(i)) for i in payload.inputs]
        return InferenceResponse(model_name=self.name, outputs=outputs)


class Keras(MLModel):
    async def load(self) -> bool:
        import keras
        import torch

        self.keras, self.torch = keras, torch
        self.model = keras.saving.load_model(self.settings.parameters.uri, compile=False)
        self.predict_numpy(np.zeros((1,) + tuple(self.model.inputs[0].shape[1:]), np.float32))
        return True

    def predict_numpy(self, x):
        with self.torch.inference_mode():
            return self.keras.ops.convert_to_numpy(self.model(x, training=False))

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        y = self.predict_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("output_0", y)])
'''


# --- request bodies ---------------------------------------------------------------------------


def v2_json(name: str, array: np.ndarray) -> bytes:
    tensor = {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def v2_binary(name: str, array: np.ndarray) -> tuple[bytes, int]:
    """A binary-extension body (JSON header, then the raw little-endian floats) and the header's
    length; the reply is asked for in binary too."""
    header = json.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": array.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return header + array.astype("<f4").tobytes(), len(header)


def answers(shape: list[int]) -> Any:
    """A check for ``check_echo``: the JSON reply's first output has ``shape``."""
    def check(reply: bytes) -> bool:
        return bool(json.loads(reply)["outputs"][0]["shape"] == shape)
    return check


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its descendants (MLServer infers in child processes)."""
    total = process_cpu_seconds(pid)
    if total is None:
        return None
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                total += tree_cpu_seconds(int(child)) or 0.0
    return total


def load_with_headers(url: str, body: bytes, content_type: str, headers: Mapping[str, str], *,
                      connections: int, duration: float, label: str = "", timeout: float = 10.0) -> Result:
    """``harness.load`` with extra request headers (wrk ``-H``): the binary extension needs
    ``Inference-Header-Content-Length``."""
    with tempfile.NamedTemporaryFile(prefix="wrk-body-", suffix=".bin") as body_file:
        body_file.write(body)
        body_file.flush()
        command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s",
                   "--timeout", f"{timeout:g}s", "-s", str(LUA_SCRIPT)]
        for key, value in headers.items():
            command += ["-H", f"{key}: {value}"]
        command += [url, "--", body_file.name, content_type]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    stats = next((json.loads(line.removeprefix("WRK_JSON ")) for line in completed.stdout.splitlines()
                  if line.startswith("WRK_JSON ")), None)
    if completed.returncode != 0 or stats is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    seconds = stats["duration_us"] / 1e6
    errors = sum(stats[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                        "timeouts"))
    return Result(label, connections, stats["requests"], seconds, stats["requests"] / seconds,
                  stats["p50_us"] / 1e3, stats["p90_us"] / 1e3, stats["p99_us"] / 1e3, errors, "wrk")


def check_binary(url: str, body: bytes, header_length: int, expected_size: int) -> None:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": OCTET, "Inference-Header-Content-Length": str(header_length)})
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = response.read()
        length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(reply[:length])
    if header["outputs"][0]["parameters"]["binary_data_size"] != expected_size \
            or len(reply) != length + expected_size:
        raise RuntimeError(f"{url}: unexpected binary reply {header}")


# --- MLServer ---------------------------------------------------------------------------------


def ensure_mlserver(venv: Path, install: bool) -> Path | None:
    """The ``mlserver`` executable in ``venv``, installing it there first if asked; None (with
    a warning) when it cannot be had."""
    executable = venv / "bin" / "mlserver"
    if executable.exists():
        return executable
    if not install:
        warn(f"MLServer is not installed in {venv} (and --no-install): skipping MLServer")
        return None
    print(f"# installing MLServer into {venv} ({' '.join(MLSERVER_SPEC)}) ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *MLSERVER_SPEC], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        warn(f"MLServer could not be installed ({exc}): skipping MLServer")
        return None
    return executable if executable.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_mlserver_repository(root: Path, keras_checkpoint: Path, parallel_workers: int,
                              batching: tuple[int, float] | None) -> int:
    """Models ``ident`` and ``mlp`` with their runtimes and settings; returns the HTTP port."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench_runtimes.py").write_text(RUNTIMES)
    port = free_port()
    (root / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
        "metrics_port": free_port(), "parallel_workers": parallel_workers, "load_models_at_startup": True,
    }))
    for name, implementation, parameters in (
        ("ident", "bench_runtimes.Identity", {}),
        ("mlp", "bench_runtimes.Keras", {"uri": str(keras_checkpoint)}),
    ):
        (root / name).mkdir(exist_ok=True)
        model_settings: dict[str, Any] = {"name": name, "implementation": implementation,
                                          "parameters": parameters}
        if batching:
            model_settings["max_batch_size"], model_settings["max_batch_time"] = batching
        (root / name / "model-settings.json").write_text(json.dumps(model_settings))
    return port


@contextlib.contextmanager
def mlserver(executable: Path, root: Path, port: int,
             timeout: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """``mlserver start ROOT``; ready once both models answer their ready route."""
    log = open(root / "mlserver.log", "wb")  # noqa: SIM115 - closed below
    env = bench_env({"KERAS_BACKEND": "torch", "PYTHONPATH": str(root)})
    process = subprocess.Popen([str(executable), "start", str(root)], cwd=root, stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not all(_ready(f"http://127.0.0.1:{port}/v2/models/{name}/ready") for name in ("ident", "mlp")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("MLServer did not start:\n" + (root / "mlserver.log").read_text()[-3000:])
            time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# --- running ----------------------------------------------------------------------------------


def measure(url: str, body: bytes, *, connections: int, duration: float, warmup: float, label: str,
            pid: int | None, headers: Mapping[str, str] | None = None) -> Result:
    """Warm up, then one measured point; ``cpu_us`` counts ``pid`` and its child processes."""

    def run(seconds: float, name: str) -> Result:
        if headers:
            return load_with_headers(url, body, OCTET, headers, connections=connections,
                                     duration=seconds, label=name)
        return load(url, body, JSON, connections=connections, duration=seconds, label=name)

    if warmup > 0:
        run(warmup, "warm-up")
    before = tree_cpu_seconds(pid) if pid else None
    result = run(duration, label)
    after = tree_cpu_seconds(pid) if pid else None
    if before is not None and after is not None and result.requests:
        result.cpu_us = (after - before) / result.requests * 1e6
    print(f"  {label}: {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
    return result


OURS_CONFIGS: dict[str, list[str]] = {
    "default": [],
    "batching": ["--threads", "2", "--max-batch-size", "16", "--max-batch-delay", "2"],
    "2 workers": ["--workers", "2"],
}
# name -> (parallel_workers, adaptive batching: (max_batch_size, max_batch_time s) or None)
MLSERVER_CONFIGS: dict[str, tuple[int, tuple[int, float] | None]] = {
    "default": (1, None),
    "in-process": (0, None),
    "batching": (0, (16, 0.002)),
}

Points = dict[tuple[str, str, int], Result]
"""(configuration, model, connections) -> result."""


@dataclass
class Target:
    """A running server: where to send V2 requests, and its pid (for CPU time)."""

    base: str
    pid: int | None


def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda result: result.rps)[len(results) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_v2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("-w", "--warmup", type=float, default=3.0, help="warm-up seconds per point")
    parser.add_argument("-r", "--rounds", type=int, default=1,
                        help="measure each point this many times, servers interleaved; the median is shown")
    parser.add_argument("-c", "--connections", default="1,16", help="comma-separated")
    parser.add_argument("--mlserver-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--ours", default=",".join(OURS_CONFIGS), help="our configurations to run")
    parser.add_argument("--mlserver", default=",".join(MLSERVER_CONFIGS),
                        help="MLServer configurations to run")
    parser.add_argument("--no-install", action="store_true", help="never install MLServer")
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not have_wrk():
        print("bench_v2 needs wrk (apt-get install -y wrk): the binary extension's header is sent with -H",
              file=sys.stderr)
        return 2
    connection_counts = [int(c) for c in args.connections.split(",")]
    rng = np.random.default_rng(0)
    small = rng.random((1, 10), dtype=np.float32)
    row = rng.random((1, 784), dtype=np.float32)
    image = rng.random((1, 224, 224, 3), dtype=np.float32)
    print(f"# bench_v2: {describe_machine()}; {args.duration:g}s per point after {args.warmup:g}s warm-up, "
          f"{args.rounds} round(s) with the servers interleaved (median shown)")
    for name in args.ours.split(","):
        print(f"#   ours {name}: studio-plug serve ident --model mlp=mlp {' '.join(OURS_CONFIGS[name])}")
    mlserver_configs = [] if args.skip_mlserver else args.mlserver.split(",")
    for name in mlserver_configs:
        workers, batching = MLSERVER_CONFIGS[name]
        described = (f"max_batch_size={batching[0]}, max_batch_time={batching[1]}s" if batching
                     else "no batching")
        print(f"#   mlserver {name}: parallel_workers={workers}, {described}")

    samples: dict[tuple[str, str, str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="studio-bench-v2-") as directory, \
            contextlib.ExitStack() as stack:
        home = Path(directory) / "studioml"
        (home / "experiments" / "ident" / "modeldir").mkdir(parents=True)
        modeldir = home / "experiments" / "mlp" / "modeldir"
        modeldir.mkdir(parents=True)
        checkpoint = write_mlp(modeldir)

        # every server up at once (idle ones cost nothing), so rounds can interleave them
        targets: dict[tuple[str, str], Target] = {}
        for config in args.ours.split(","):
            ours = stack.enter_context(studio_server("ident", "--model", "mlp=mlp", *OURS_CONFIGS[config],
                                                     home=home))
            targets["ours", config] = Target(ours.url, ours.process.pid if ours.process else None)
        with urllib.request.urlopen(targets["ours", args.ours.split(",")[0]].base + "v2/models/mlp",
                                    timeout=10) as response:
            mlp_input = json.loads(response.read())["inputs"][0]["name"]
        executable = ensure_mlserver(args.mlserver_venv, not args.no_install) if mlserver_configs else None
        for config in mlserver_configs:
            if executable is None:
                break
            root = Path(directory) / f"mlserver-{config}"
            port = write_mlserver_repository(root, checkpoint, *MLSERVER_CONFIGS[config])
            try:
                process = stack.enter_context(mlserver(executable, root, port))
            except RuntimeError as exc:
                warn(f"MLServer ({config}) skipped: {exc}")
                continue
            targets["mlserver", config] = Target(f"http://127.0.0.1:{port}/", process.pid)

        bodies = {"ident": v2_json("x", small), "mlp": v2_json(mlp_input, row)}
        for target in targets.values():
            for model, body in bodies.items():
                check_echo(f"{target.base}v2/models/{model}/infer", body, JSON, answers([1, 10]))
        # the ceiling: a raw ASGI echo of the same body on the same Hypercorn (bench_http's floor)
        # answers faster than any app could, so no configuration of ours can pass its req/s
        echo = stack.enter_context(asgi_server("bench.harness:echo_app"))
        targets["floor", "echo"] = Target(echo.url, echo.process.pid if echo.process else None)
        order = list(targets)
        for model, body in bodies.items():
            for connections in connection_counts:
                for round_ in range(args.rounds):
                    for name, config in order[round_ % len(order):] + order[:round_ % len(order)]:
                        target = targets[name, config]
                        samples.setdefault((name, config, model, connections), []).append(measure(
                            f"{target.base}v2/models/{model}/infer", body, connections=connections,
                            pid=target.pid, duration=args.duration, warmup=args.warmup,
                            label=f"{name} {config} {model} c{connections}"))

        target = targets["ours", args.ours.split(",")[0]]
        url = f"{target.base}v2/models/ident/infer"
        json_body = v2_json("x", image)
        binary_body, header_length = v2_binary("x", image)
        check_echo(url, json_body, JSON, answers([1, 224, 224, 3]))
        check_binary(url, binary_body, header_length, image.nbytes)
        modes: list[tuple[str, bytes, dict[str, str] | None]] = [
            ("json", json_body, None),
            ("binary", binary_body, {"Inference-Header-Content-Length": str(header_length)}),
        ]
        for connections in connection_counts:
            for round_ in range(args.rounds):
                for mode, body, headers in modes[round_ % 2:] + modes[:round_ % 2]:
                    samples.setdefault(("large", mode, "ident", connections), []).append(measure(
                        url, body, connections=connections, pid=target.pid, headers=headers,
                        duration=args.duration, warmup=args.warmup,
                        label=f"ours large {mode} c{connections}"))

    points: dict[str, Points] = {"ours": {}, "mlserver": {}, "large": {}, "floor": {}}
    for (group, config, model, connections), results in samples.items():
        points[group][config, model, connections] = median(results)
    return report(points["ours"], points["mlserver"], points["large"], connection_counts, args.json,
                  points["floor"])


def _best(points: Points, model: str, connections: int) -> tuple[str, Result] | None:
    found = [(config, r) for (config, m, c), r in points.items() if (m, c) == (model, connections)]
    return max(found, key=lambda pair: pair[1].rps) if found else None


def report(ours: Points, theirs: Points, large: Points, connection_counts: list[int],
           json_path: Path | None, floor: Points | None = None) -> int:
    floor = floor or {}
    print()
    print("V2 JSON, ours vs MLServer 1.7.1 (server cpu: the server's process tree, per request)")
    rows = []
    for model in ("ident", "mlp"):
        for connections in connection_counts:
            for server, points in (("mlserver", theirs), ("ours", ours), ("floor", floor)):
                for (config, m, c), r in points.items():
                    if (m, c) != (model, connections):
                        continue
                    other = theirs.get((config, m, c)) if server == "ours" else None
                    rows.append([model, connections, f"{server} {config}", r.rps, r.p50_ms, r.p99_ms,
                                 r.cpu_us or float("nan"), r.errors,
                                 f"{r.rps / other.rps:.2f}x" if other else ""])
    print_table(rows, ["model", "conns", "server", "req/s", "p50 ms", "p99 ms", "server cpu us/req",
                       "errors", "ours/mlserver same config"])
    print()
    print("V2 binary vs V2 JSON, 1x224x224x3 FP32 through our identity model (reply in the same form)")
    rows = []
    for connections in connection_counts:
        for mode in ("json", "binary"):
            result = large[mode, "ident", connections]
            ratio = f"{result.rps / large['json', 'ident', connections].rps:.1f}x" if mode == "binary" else ""
            rows.append([mode, connections, result.rps, result.p50_ms, result.p99_ms,
                         result.cpu_us or float("nan"), result.errors, ratio])
    print_table(rows, ["body", "conns", "req/s", "p50 ms", "p99 ms", "server cpu us/req", "errors",
                       "binary/json"])
    print()
    top = max(connection_counts)
    failed = False
    for model in ("ident", "mlp"):
        mine, best_other = ours.get(("default", model, top)), _best(theirs, model, top)
        if mine is None or best_other is None:
            print(f"target ours (defaults) >= {MODEL_TARGET}x MLServer's best ({model}, c{top}): "
                  "not measured")
            continue
        speedup = mine.rps / best_other[1].rps
        failed |= speedup < MODEL_TARGET
        print(f"target ours (defaults) >= {MODEL_TARGET}x MLServer's best ({model}, c{top}, mlserver "
              f"{best_other[0]}): {speedup:.2f}x {'met' if speedup >= MODEL_TARGET else 'NOT met'}")
        ceiling = floor.get(("echo", model, top))
        if ceiling is not None:
            print(f"  ceiling on this Hypercorn: its raw echo of the same body, {ceiling.rps:,.0f} "
                  f"req/s = {ceiling.rps / best_other[1].rps:.2f}x MLServer's best; ours is "
                  f"{mine.rps / ceiling.rps:.2f} of it")
    speedup = large["binary", "ident", top].rps / large["json", "ident", top].rps
    failed |= speedup < BINARY_TARGET
    print(f"target binary >= {BINARY_TARGET:g}x JSON (1x224x224x3, c{top}): {speedup:.1f}x "
          f"{'met' if speedup >= BINARY_TARGET else 'NOT met'}")
    if json_path:
        json_path.write_text(json.dumps({
            name: [{**r.as_dict(), "config": config, "model": model}
                   for (config, model, _), r in points.items()]
            for name, points in (("ours", ours), ("mlserver", theirs), ("large", large),
                                 ("floor", floor))
        }, indent=2))
    errors = any(r.errors for group in (ours, theirs, large) for r in group.values())
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
