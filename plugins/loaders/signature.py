"""How a request dict meets a framework model's named inputs and outputs (Keras, torch, ...).

Two calling conventions, one model:

- ``POST /`` (the seed's contract): each key of the request is an input batch, run through the
  model and answered under the same key, whatever the key is. A model with several inputs is
  called once with keys that are exactly its input names, and answers with its named outputs; so
  does a model with several outputs sent under its input's name (any other key is answered with
  a dict of the outputs).
- ``named`` (V2, whose tensors have names): the keys are the model's input names, the model is
  called once and answers with its named outputs.

Inputs are cast to the dtype the model declares and their shapes checked against it, so a
wrong request is a 400 that says what the model takes, not a framework traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from studio_plugins import BadRequest, Payload, TensorSpec

log = logging.getLogger("studio_plugins.loaders")

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""Calls the framework model: named input arrays (in the model's order) -> named output arrays."""

# dtype names as numpy, torch (without "torch.") and Keras spell them -> Open Inference Protocol.
_NUMPY_NAMES = {
    "bool": "BOOL",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
_DATATYPES = {**_NUMPY_NAMES, "bfloat16": "BF16"}
_NUMPY = {datatype: np.dtype(name) for name, datatype in _NUMPY_NAMES.items()}


def datatype_of(dtype: object) -> str:
    """``FP32`` for ``float32``, ``np.float32``, ``torch.float32``; ``UNKNOWN`` if not known."""
    name = str(getattr(dtype, "name", "") or dtype).removeprefix("torch.")
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        name = np.dtype(dtype).name
    return _DATATYPES.get(name, "UNKNOWN")


def numpy_dtype(datatype: str) -> np.dtype | None:
    """The numpy dtype for a protocol datatype (``None`` for BF16 and unknown ones)."""
    return _NUMPY.get(datatype)


@dataclass(frozen=True)
class Expected:
    """What the model declares about one input; ``None`` where it does not say."""

    name: str
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None
    """-1: any size on that axis (the first is the batch). Requests are checked against it."""
    example: tuple[int, ...] | None = None
    """A shape the model is known to take where it declares none (TorchScript: the one it was
    traced with): for priming and metadata, never to refuse a request."""

    @property
    def spec(self) -> TensorSpec:
        """``UNKNOWN`` (which protocols must not show) unless both dtype and shape are known."""
        shape = self.shape if self.shape is not None else (
            batch_free(self.example) if self.example is not None else None)
        datatype = datatype_of(self.dtype) if self.dtype is not None else "UNKNOWN"
        if shape is None or datatype == "UNKNOWN":
            return TensorSpec(self.name)
        return TensorSpec(self.name, datatype, shape)

    def zeros(self) -> np.ndarray | None:
        """A batch of one, all zeros, to prime the model with (None: shape or dtype unknown)."""
        shape = self.shape if self.shape is not None else self.example
        if shape is None or self.dtype is None or not shape:
            return None
        return np.zeros(tuple(1 if size < 0 else size for size in shape), self.dtype)


def batch_free(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An example's shape with its first axis (the batch) as -1."""
    return (-1, *shape[1:]) if shape else shape


def output_specs(outputs: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """What one call's outputs say about every call's: dtypes, and shapes with any batch."""
    specs = []
    for name, value in outputs.items():
        array = np.asarray(value)
        specs.append(TensorSpec(name, datatype_of(array.dtype), batch_free(array.shape)))
    return tuple(specs)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("N" if size < 0 else str(size) for size in shape) + ")"


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(
        want in (-1, got) for want, got in zip(expected, shape, strict=True)
    )


def prepare(expected: Expected | None, value: Any, key: str) -> np.ndarray:
    """``value`` as a C-contiguous, writable array of the dtype and shape the model takes."""
    dtype = expected.dtype if expected is not None else None
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if dtype is not None and array.dtype != dtype:
            if array.dtype.kind not in "biuf":
                raise TypeError(f"{array.dtype} values")
            array = array.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"input {key!r} is not a numeric array ({exc})") from None
    if array.dtype.kind not in "biufc":
        raise BadRequest(f"input {key!r} is not a numeric array (dtype {array.dtype})")
    if expected is not None and expected.shape is not None and not _fits(array.shape, expected.shape):
        takes = _shape_text(expected.shape)
        if expected.shape and expected.shape[0] >= 0:  # saved with a fixed batch: say so, and how
            raise BadRequest(
                f"input {key!r} has shape {tuple(array.shape)}; the model's input {expected.name!r} "
                f"takes exactly {takes}: it was saved with a fixed batch size of {expected.shape[0]}",
                hint="save it with a dynamic first axis to take any batch (torch.export: "
                "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})",
            )
        raise BadRequest(
            f"input {key!r} has shape {tuple(array.shape)}; the model's input {expected.name!r} "
            f"takes {takes} (N: any size; the first axis is the batch)"
        )
    # Frameworks want to own writable memory (torch warns on read-only numpy views).
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    return array


class TensorModel:
    """``ServedModel.predict`` for a framework model, thread-safe if ``run`` is."""

    def __init__(self, run: Runner, inputs: Sequence[Expected]) -> None:
        self.run = run
        self.inputs = tuple(inputs)
        self.input_names = frozenset(expected.name for expected in self.inputs)

    def __call__(self, data: Payload) -> Payload:
        """The seed's contract (``POST /``): each key's answer under that key."""
        if len(self.inputs) > 1:  # the seed's shape cannot say which key is which input
            return self.named(data)
        expected = self.inputs[0] if self.inputs else None
        reply: Payload = {}
        for key, value in data.items():
            outputs = self.run({expected.name if expected else key: prepare(expected, value, key)})
            if len(outputs) == 1:
                reply[key] = next(iter(outputs.values()))
            elif len(data) == 1 and expected is not None and key == expected.name:
                return dict(outputs)  # several outputs, asked for by the input's name
            else:
                reply[key] = outputs
        return reply

    def named(self, data: Payload) -> Payload:
        """Named inputs in, named outputs out (V2): the keys are the model's input names."""
        if not self.inputs:  # not declared: the model's one input, whatever its name
            if len(data) != 1:
                raise BadRequest(
                    f"the model does not declare its inputs: send one (got {len(data)})")
            (key, value), = data.items()
            return dict(self.run({key: prepare(None, value, key)}))
        if data.keys() != self.input_names:
            raise BadRequest(
                f"the model takes the input{'s' if len(self.inputs) > 1 else ''} "
                f"{', '.join(e.name for e in self.inputs)}: send exactly "
                f"{'those keys' if len(self.inputs) > 1 else 'that key'} "
                f"(got {', '.join(map(repr, data)) or 'none'})"
            )
        return dict(self.run({e.name: prepare(e, data[e.name], e.name) for e in self.inputs}))

    def prime(self) -> dict[str, np.ndarray] | None:
        """One call with a batch of zeros, so the first request does not pay for warm-up; its
        outputs (which say what the model answers, where it does not declare that).

        None when the inputs are not fully declared or the model refuses zeros (it may still
        serve real requests: that is logged, not raised)."""
        batch = {expected.name: expected.zeros() for expected in self.inputs}
        if not batch or any(value is None for value in batch.values()):
            log.info("model inputs not fully declared; not primed (the first request is slower)")
            return None
        try:
            return self.run(batch)  # type: ignore[arg-type]
        except Exception as exc:
            log.warning("priming with zeros failed (%s: %s); the first request is slower",
                        type(exc).__name__, exc)
            return None


def name_outputs(
    outputs: Any, names: Sequence[str], to_numpy: Callable[[Any], np.ndarray]
) -> dict[str, np.ndarray]:
    """A framework's result (one tensor, a sequence or a mapping of them) as named arrays.

    Mapping keys name themselves; positions take ``names`` when they fit, else ``output_<i>``.
    """
    if isinstance(outputs, Mapping):
        return {str(name): to_numpy(value) for name, value in outputs.items()}
    if not isinstance(outputs, list | tuple):
        outputs = (outputs,)
    if len(names) != len(outputs):
        names = [f"output_{index}" for index in range(len(outputs))]
    return {name: to_numpy(value) for name, value in zip(names, outputs, strict=True)}


def unique_names(names: Sequence[str]) -> list[str]:
    """``["dense", "dense"]`` -> ``["dense", "dense_1"]``: reply keys must not collide."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}_{count}")
    return result
