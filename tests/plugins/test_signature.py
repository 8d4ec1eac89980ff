"""The request semantics shared by the framework loaders, with a recording stand-in model."""

from __future__ import annotations

import numpy as np
import pytest

from plugins.loaders.signature import (
    Expected,
    TensorModel,
    datatype_of,
    name_outputs,
    numpy_dtype,
    output_specs,
    prepare,
    unique_names,
)
from studio_plugins import BadRequest, TensorSpec


class Recorder:
    """A runner that records what it was called with and answers x * 2 per input."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def __call__(self, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(named)
        return {f"out_{name}": value * 2 for name, value in named.items()}


def test_datatypes_from_numpy_torch_and_keras_spellings() -> None:
    assert datatype_of(np.dtype("float32")) == datatype_of(np.float32) == datatype_of("float32") == "FP32"
    assert datatype_of("torch.int64") == "INT64" and datatype_of("bfloat16") == "BF16"
    assert datatype_of("complex64") == "UNKNOWN" and datatype_of(None) == "UNKNOWN"
    assert numpy_dtype("FP32") == np.float32 and numpy_dtype("BF16") is None


def test_prepare_casts_checks_and_copies_read_only_arrays() -> None:
    expected = Expected("x", np.dtype("float32"), (-1, 2))
    array = prepare(expected, [[1, 2], [3, 4]], "x")
    assert array.dtype == np.float32 and array.shape == (2, 2)
    frozen = np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), np.float32).reshape(2, 2)
    assert not frozen.flags.writeable and prepare(expected, frozen, "x").flags.writeable
    with pytest.raises(BadRequest, match=r"takes \(N, 2\)"):
        prepare(expected, np.ones((2, 3)), "x")
    with pytest.raises(BadRequest, match="not a numeric array"):
        prepare(expected, ["a", "b"], "x")
    with pytest.raises(BadRequest, match="not a numeric array"):
        prepare(None, {"nested": 1}, "x")


def test_each_key_is_answered_under_itself_even_the_input_name() -> None:
    run = Recorder()
    model = TensorModel(run, [Expected("x", np.dtype("float32"), (-1, 1))])
    # the seed's contract: a key that happens to be the model's input name is no exception
    reply = model({"x": np.ones((1, 1))})
    assert set(reply) == {"x"} and reply["x"].tolist() == [[2.0]]
    reply = model({"a": np.ones((2, 1)), "b": np.zeros((3, 1))})
    assert set(reply) == {"a", "b"} and reply["a"].shape == (2, 1)
    assert [list(call) for call in run.calls] == [["x"], ["x"], ["x"]]


def test_named_calls_take_input_names_and_answer_with_output_names() -> None:
    run = Recorder()
    model = TensorModel(run, [Expected("x", np.dtype("float32"), (-1, 1))])
    assert set(model.named({"x": np.ones((1, 1))})) == {"out_x"}  # the model's own output names
    with pytest.raises(BadRequest, match=r"takes the input x: send exactly that key \(got 'a'\)"):
        model.named({"a": np.ones((1, 1))})
    with pytest.raises(BadRequest, match="takes the input x"):
        model.named({"x": np.ones((1, 1)), "y": np.ones((1, 1))})
    assert len(run.calls) == 1


class TwoOutputs(Recorder):
    def __call__(self, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(named)
        (value,) = named.values()
        return {"double": value * 2, "triple": value * 3}


def test_several_outputs_are_named_under_the_input_name_else_a_dict_per_key() -> None:
    model = TensorModel(TwoOutputs(), [Expected("x", np.dtype("float32"), (-1, 1))])
    assert set(model({"x": np.ones((1, 1))})) == {"double", "triple"}
    reply = model({"k": np.ones((1, 1)), "x": np.ones((2, 1))})
    assert set(reply) == {"k", "x"} and set(reply["k"]) == {"double", "triple"}
    assert reply["x"]["triple"].tolist() == [[3.0], [3.0]]


def test_several_inputs_need_exactly_their_names() -> None:
    model = TensorModel(Recorder(), [Expected("a"), Expected("b")])
    assert set(model({"b": np.ones(1), "a": np.ones(1)})) == {"out_a", "out_b"}
    assert set(model.named({"b": np.ones(1), "a": np.ones(1)})) == {"out_a", "out_b"}
    with pytest.raises(BadRequest, match="takes the inputs a, b"):
        model({"a": np.ones(1)})


def test_undeclared_inputs_take_one_key_when_named() -> None:
    run = Recorder()
    model = TensorModel(run, [])
    assert set(model({"p": np.ones(1), "q": np.ones(1)})) == {"p", "q"}  # one call per key
    assert set(model.named({"p": np.ones(1)})) == {"out_p"}
    with pytest.raises(BadRequest, match="does not declare its inputs: send one"):
        model.named({"p": np.ones(1), "q": np.ones(1)})


def test_prime_runs_one_batch_of_zeros_when_inputs_are_declared() -> None:
    run = Recorder()
    primed = TensorModel(run, [Expected("x", np.dtype("float32"), (-1, 3, -1))]).prime()
    (call,) = run.calls
    assert call["x"].shape == (1, 3, 1) and call["x"].dtype == np.float32 and not call["x"].any()
    assert primed is not None and set(primed) == {"out_x"}  # what it answers
    assert TensorModel(run, [Expected("x")]).prime() is None  # nothing known: nothing to prime with
    assert len(run.calls) == 1


def test_an_example_shape_primes_and_describes_but_never_refuses() -> None:
    traced = Expected("x", np.dtype("float32"), example=(2, 3, 8))
    assert traced.zeros().shape == (2, 3, 8)
    assert traced.spec == TensorSpec("x", "FP32", (-1, 3, 8))
    assert prepare(traced, np.ones((5, 3, 16)), "x").shape == (5, 3, 16)
    assert Expected("x").spec.datatype == "UNKNOWN"
    assert Expected("x", np.dtype("float32")).spec.datatype == "UNKNOWN"  # no shape: not described
    specs = output_specs({"p": np.ones((1, 2), np.float32), "n": np.int64(3)})
    assert specs == (TensorSpec("p", "FP32", (-1, 2)), TensorSpec("n", "INT64", ()))


def test_output_naming() -> None:
    def identity(value: object) -> np.ndarray:
        return np.asarray(value)

    assert list(name_outputs({"p": 1}, ["ignored"], identity)) == ["p"]
    assert list(name_outputs((1, 2), ["a", "b"], identity)) == ["a", "b"]
    assert list(name_outputs((1, 2), ["a"], identity)) == ["output_0", "output_1"]
    assert list(name_outputs(1, ["only"], identity)) == ["only"]
    assert unique_names(["dense", "dense", "x"]) == ["dense", "dense_1", "x"]
