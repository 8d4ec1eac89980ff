"""The compiled call path (plugins/loaders/tracing.py): a model's own call compiled against
loaded, and how long ``serve`` takes to answer, in one run.

- **one call in process**: the Keras MLP 784-256-10 (``bench_keras.write_mlp``) and the same MLP
  in torch saved with ``torch.export`` (``.pt2``), each loaded by its loader and called as the
  server calls it (``ServedModel.predict`` on a pickled request's ``{"x": 1x784 float32}``),
  eager and compiled (``ServedModel.compiler()``, timed too), in interleaved rounds; the ratio
  compiled / eager of the p50s. Target for the Keras MLP: <= 0.5.
- **serve -> ready**: ``studio-plug serve`` started as a user starts it, timed from the process's
  start to its ``Serving ...`` line and to its first answer, for the identity model (an empty
  experiment) and the Keras MLP checkpoint; for the MLP also until its compiled model is swapped
  in (the log line). The median of ``--starts`` starts. Targets: identity < 1 s, Keras < 5 s.

    python -m bench.bench_compile                 # ~1 min
    python -m bench.bench_compile -d 1 --starts 1 # a quick look
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_keras import time_calls, write_mlp
from bench.harness import describe_machine, print_table, studio_server

PICKLE = "application/python-pickle"


def write_torch_mlp(modeldir: Path) -> Path:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10),
                                 torch.nn.Softmax(dim=1)).eval()
    program = torch.export.export(module, (torch.zeros(2, 784),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = modeldir / "mlp.pt2"
    torch.export.save(program, str(path))
    return path


def one_call(loader: str, checkpoint: Path, x: np.ndarray, seconds: float,
             rounds: int) -> dict[str, float]:
    from studio_plugins import LoadOptions
    from studio_plugins.testing import make_host

    eager = make_host().loaders()[loader].load(checkpoint, LoadOptions())
    assert eager.compiler is not None
    started = time.perf_counter()
    compiled = eager.compiler()
    compile_s = time.perf_counter() - started
    payload = {"x": x}
    np.testing.assert_allclose(compiled.predict(dict(payload))["x"], eager.predict(dict(payload))["x"],
                               rtol=1e-4, atol=1e-5)
    calls: dict[str, Callable[[], Any]] = {"eager": lambda: eager.predict(dict(payload)),
                                           "compiled": lambda: compiled.predict(dict(payload))}
    p50s: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):  # interleaved: load on the machine moves both alike
        for name, call in calls.items():
            p50s[name].append(time_calls(call, seconds / rounds)["p50_us"])
    eager_us, compiled_us = (statistics.median(p50s[name]) for name in ("eager", "compiled"))
    return {"eager_us": eager_us, "compiled_us": compiled_us, "ratio": compiled_us / eager_us,
            "compile_s": compile_s}


def serve_to_ready(key: str, home: Path, body: bytes, wait_for: str | None) -> dict[str, float]:
    started = time.perf_counter()
    with studio_server(key, home=home) as server:
        ready = time.perf_counter() - started
        request = urllib.request.Request(server.url, data=body, method="POST",
                                         headers={"Content-Type": PICKLE})
        with urllib.request.urlopen(request, timeout=60) as reply:
            reply.read()
        answered = time.perf_counter() - started
        swapped = float("nan")
        if wait_for is not None:
            deadline = time.monotonic() + 60
            while not any(wait_for in line for line in server.stderr_lines):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {wait_for!r} in 60 s:\n{server.output()}")
                time.sleep(0.01)
            swapped = time.perf_counter() - started
    return {"ready": ready, "answered": answered, "compiled": swapped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--duration", type=float, default=6.0,
                        help="seconds of calls per model and path")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--starts", type=int, default=3, help="server starts per model")
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    body = pickle.dumps({"x": x}, protocol=5)
    print(f"# bench_compile: {describe_machine()}; MLP 784-256-10, 1x784 float32 per call")
    with tempfile.TemporaryDirectory(prefix="studio-bench-compile-") as directory:
        home = Path(directory)
        dirs = {}
        for key in ("identity", "mlp", "torchmlp"):
            dirs[key] = home / "experiments" / key / "modeldir"
            dirs[key].mkdir(parents=True)
        keras_path = write_mlp(dirs["mlp"])
        torch_path = write_torch_mlp(dirs["torchmlp"])

        # the servers first, with nothing else loaded in this process to compete for the cores
        starts: dict[str, list[dict[str, float]]] = {"identity": [], "mlp": []}
        for _ in range(args.starts):
            starts["identity"].append(serve_to_ready("identity", home, body, None))
            starts["mlp"].append(serve_to_ready("mlp", home, body, "model mlp compiled in"))

        import torch

        torch.set_num_threads(1)  # as a served model runs at one request per call
        calls = {
            "Keras MLP (.keras)": one_call("keras", keras_path, x, args.duration, args.rounds),
            "torch MLP (torch.export, .pt2)": one_call("torch", torch_path, x, args.duration,
                                                       args.rounds),
        }

    print()
    print_table(
        [[name, r["eager_us"], r["compiled_us"], r["ratio"], r["compile_s"]] for name, r in calls.items()],
        ["one call in process, 1 thread", "eager p50 us", "compiled p50 us", "compiled / eager",
         "compile s"],
    )
    print()

    def median(key: str, field: str) -> float:
        return statistics.median(start[field] for start in starts[key])

    print_table(
        [[name, median(key, "ready"), median(key, "answered"), median(key, "compiled"), target]
         for name, key, target in (("identity", "identity", "< 1 s"),
                                   ("Keras MLP checkpoint", "mlp", "< 5 s"))],
        [f"serve -> (median of {args.starts})", "ready s", "first answer s", "compiled in s",
         "target (ready)"],
    )
    keras_ratio = calls["Keras MLP (.keras)"]["ratio"]
    ready_identity, ready_keras = median("identity", "ready"), median("mlp", "ready")
    met = keras_ratio <= 0.5 and ready_identity < 1 and ready_keras < 5
    print(f"\nKeras MLP compiled / eager {keras_ratio:.2f} (target <= 0.5); serve -> ready identity "
          f"{ready_identity:.2f} s (< 1 s), Keras {ready_keras:.2f} s (< 5 s): "
          f"{'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
