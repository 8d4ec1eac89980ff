"""The loaders' compiled call path (plugins/loaders/tracing.py), in process with real Keras and
torch checkpoints written here: the compiled model answers as the loaded one does, and one whose
trace would answer otherwise is refused, saying why."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from plugins.loaders import tracing
from plugins.loaders.signature import Expected
from studio_plugins import LoadOptions, ServedModel
from studio_plugins.testing import make_host

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

RNG = np.random.default_rng(7)


def compiled(model: ServedModel) -> ServedModel:
    assert model.compiler is not None
    fast = model.compiler()
    assert fast.compiler is None and fast.compiled and fast.predict is not model.predict
    return fast


def same_answers(eager: ServedModel, fast: ServedModel, payloads: list[dict[str, np.ndarray]],
                 named: bool = False) -> None:
    for payload in payloads:
        want = (eager.predict_named if named and eager.predict_named else eager.predict)(dict(payload))
        got = (fast.predict_named if named and fast.predict_named else fast.predict)(dict(payload))
        assert list(got) == list(want)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, **tracing.TOLERANCE)
            assert got[key].dtype == value.dtype and got[key].shape == value.shape


def load(loader: str, path: Path, trust: bool = False) -> ServedModel:
    return make_host().loaders()[loader].load(path, LoadOptions(trust_checkpoint=trust))


def mlp(path: Path) -> Path:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.save(path)
    return path


def test_a_keras_mlp_compiled_answers_as_loaded(tmp_path: Path) -> None:
    eager = load("keras", mlp(tmp_path / "mlp.keras"))
    fast = compiled(eager)
    assert fast.compiled == "torch.jit.trace, frozen" and fast.inputs == eager.inputs
    batches = [{"x": RNG.normal(size=(rows, 784)).astype(np.float32)} for rows in (1, 5, 16, 33)]
    same_answers(eager, fast, batches)
    same_answers(eager, fast, [{"a": batches[0]["x"], "b": batches[1]["x"].astype(np.float64)}])
    # every batch size up to the default --max-batch-size was warmed and timed, for the data
    # plane's choice of calls run on the event loop (core/dataplane/inline.py)
    assert [size for size, _ in fast.call_times] == [rows * 784 for rows in range(1, 33)]
    assert all(0 < seconds < tracing.TIMED_UP_TO for _, seconds in fast.call_times)
    assert eager.call_times == ()


def test_a_keras_model_with_two_named_inputs_and_outputs(tmp_path: Path) -> None:
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    total = keras.layers.Dense(4, name="total")(joined)
    scaled = keras.layers.Dense(1, name="scaled")(keras.layers.Multiply()([a, a]))
    keras.Model({"a": a, "b": b}, {"total": total, "scaled": scaled}).save(tmp_path / "two.keras")
    eager = load("keras", tmp_path / "two.keras")
    fast = compiled(eager)
    payloads = [{"a": RNG.normal(size=(rows, 3)).astype(np.float32),
                 "b": RNG.normal(size=(rows, 2)).astype(np.float32)} for rows in (1, 4, 9)]
    same_answers(eager, fast, payloads)
    same_answers(eager, fast, payloads, named=True)
    assert set(fast.predict_named({**payloads[0]})) == {"scaled", "total"}  # type: ignore[arg-type,misc]


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * 2


class Pair(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, (a * b).sum(dim=1)


@pytest.mark.parametrize("trace", [False, True])
def test_torchscript_is_frozen_and_answers_as_loaded(tmp_path: Path, trace: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.trace(Affine(), torch.ones(1, 3)) if trace else torch.jit.script(Affine())
        torch.jit.save(module, str(tmp_path / "m.pt"))
    eager = load("torch", tmp_path / "m.pt")
    if not trace:  # a scripted module declares no shapes: nothing to check it on
        with pytest.raises(tracing.CompileRefused, match="does not declare its shape"):
            eager.compiler()  # type: ignore[misc]
        return
    fast = compiled(eager)
    assert fast.compiled == "torch.jit.freeze"
    assert fast.call_times == ()  # scripted code may loop on values: never timed by shape
    same_answers(eager, fast, [{"x": RNG.normal(size=(rows, 3)).astype(np.float32)} for rows in (1, 7)])


def test_a_torch_export_program_with_two_inputs_compiled_answers_as_loaded(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch")
    program = torch.export.export(Pair(), (torch.ones(2, 3), torch.ones(2, 3)),
                                  dynamic_shapes={"a": {0: batch}, "b": {0: batch}})
    torch.export.save(program, str(tmp_path / "pair.pt2"))
    eager = load("torch", tmp_path / "pair.pt2")
    fast = compiled(eager)
    assert fast.compiled == "torch.jit.trace, frozen"
    payloads = [{"a": RNG.normal(size=(rows, 3)).astype(np.float32),
                 "b": RNG.normal(size=(rows, 3)).astype(np.float32)} for rows in (1, 2, 11)]
    same_answers(eager, fast, payloads, named=True)


def test_warm_times_every_size_while_quick_and_only_fixed_shapes() -> None:
    calls: list[int] = []

    def runner(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(named.values())))
        calls.append(rows)
        if rows >= 5:  # slow from five rows on: timed once, then warmed only at WARM_ROWS
            time.sleep(tracing.TIMED_UP_TO * 1.5)
        return dict(named)

    fixed = [Expected("x", np.dtype("float32"), (-1, 3))]
    times = tracing.warm(runner, fixed)
    assert [size for size, _ in times] == [3 * rows for rows in range(1, 6)]
    assert sorted(set(calls)) == [1, 2, 3, 4, 5, 8, 16, 32]
    calls.clear()
    open_axis = [Expected("x", np.dtype("float32"), (-1, -1))]  # time would depend on more than rows
    assert tracing.warm(runner, open_axis) == ()
    assert sorted(set(calls)) == list(tracing.WARM_ROWS)


def test_a_torch_export_program_with_one_input(tmp_path: Path) -> None:
    program = torch.export.export(Affine(), (torch.ones(2, 3),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(tmp_path / "affine.pt2"))
    eager = load("torch", tmp_path / "affine.pt2")
    same_answers(eager, compiled(eager),
                 [{"x": RNG.normal(size=(rows, 3)).astype(np.float32)} for rows in (1, 3, 40)])


def branching_model(path: Path) -> Path:
    """Doubles x when its largest value is positive, else subtracts one: a Python branch on the
    input's values, which a trace bakes in."""
    inputs = keras.Input((3,), name="x")
    branch = keras.layers.Lambda(lambda x: x * 2.0 if float(x.max()) > 0 else x - 1.0,
                                 output_shape=(3,))
    keras.Model(inputs, branch(inputs)).save(path)
    return path


def test_a_model_whose_trace_answers_otherwise_is_refused_saying_why(tmp_path: Path) -> None:
    eager = load("keras", branching_model(tmp_path / "branch.keras"), trust=True)
    with pytest.raises(tracing.CompileRefused, match=r"disagrees with the loaded one on the priming "
                                                     r"batch: output .* differs by up to 1"):
        eager.compiler()  # type: ignore[misc]
    x = np.array([[1.0, -2.0, 0.5]], np.float32)  # the loaded model still answers both ways
    np.testing.assert_allclose(eager.predict({"x": x})["x"], 2 * x)
    np.testing.assert_allclose(eager.predict({"x": -x * x})["x"], -x * x - 1)


def test_the_check_holds_compiled_answers_to_the_tolerance() -> None:
    inputs = [Expected("x", np.dtype(np.float32), (-1, 4))]

    def eager(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": named["x"] * 3, "n": np.arange(len(named["x"]))}

    def off_by(delta: float, count: int = 0):  # type: ignore[no-untyped-def]
        def run(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = eager(named)
            return {"y": out["y"] + delta, "n": out["n"] + count}
        return run

    tracing.check(eager, off_by(1e-7), inputs, varied=True)  # float noise: agrees
    with pytest.raises(tracing.CompileRefused, match=r"output 'y' differs by up to 0\.001"):
        tracing.check(eager, off_by(1e-3), inputs, varied=True)
    with pytest.raises(tracing.CompileRefused, match="output 'n' differs"):
        tracing.check(eager, off_by(0.0, 1), inputs, varied=True)

    def fixed_batch(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = eager(named)
        return {"y": out["y"][:1], "n": out["n"][:1]}  # a batch size baked in at one row

    with pytest.raises(tracing.CompileRefused, match="on a random batch: output 'y' is float32"):
        tracing.check(eager, fixed_batch, inputs, varied=True)
