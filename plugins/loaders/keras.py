"""The default loader: Keras 3 checkpoints (``*.keras``, ``*.h5``, ``*.hdf5``, ``*.hdf``).

Studio.ML's training scripts wrote ``checkpoint.03-0.45.hdf``-style names, so all four count.
Keras runs on the torch backend unless ``KERAS_BACKEND`` says otherwise; models are loaded with
``compile=False`` in safe mode (a ``Lambda`` layer's Python code is refused unless
``--trust-checkpoint``) and called directly (``model.predict`` costs about a millisecond more per
call), from up to ``--threads`` threads at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from plugins.loaders import tracing
from plugins.loaders.signature import (
    Expected,
    Runner,
    TensorModel,
    datatype_of,
    name_outputs,
    numpy_dtype,
    unique_names,
)
from plugins.loaders.torch_runtime import IMPORT_LOCK, choose_device, import_torch, single_threaded, to_numpy
from studio_plugins import (
    Loader,
    LoadError,
    LoadOptions,
    MissingDependencyError,
    ServedModel,
    TensorSpec,
    hookimpl,
)

log = logging.getLogger("studio_plugins.loaders.keras")

UNSAFE_HINT = "if you trust this checkpoint, serve it with --trust-checkpoint"


# Keras 3 picks TensorFlow unless told otherwise, and the keras extra installs torch: set before
# the first `import keras` anywhere in the server, so a --wrapper that imports keras at its top
# runs on torch too (the host loads this plugin before it imports any wrapper)
os.environ.setdefault("KERAS_BACKEND", "torch")


def import_keras() -> ModuleType:
    with IMPORT_LOCK:  # parallel model loads: see torch_runtime.IMPORT_LOCK
        try:
            import keras
        except ImportError as exc:
            # keras present but its backend missing (torch, by default) is the same fix
            raise MissingDependencyError(exc.name or "keras", "keras") from None
    return keras


@contextlib.contextmanager
def readable_name(checkpoint: Path) -> Iterator[Path]:
    """Keras chooses the reader by file suffix and knows ``.h5``/``.hdf5`` but not Studio.ML's
    ``.hdf``: such a file is read through a ``.h5``-named link (or copy) in a temp dir."""
    if checkpoint.suffix != ".hdf":
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="studio-keras-") as directory:
        alias = Path(directory) / (checkpoint.stem + ".h5")
        try:
            alias.symlink_to(checkpoint.resolve())
        except OSError:
            import shutil

            shutil.copyfile(checkpoint, alias)
        yield alias


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _h5_without_model(path: Path) -> bool:
    """An HDF5 file with no ``model_config`` attribute holds weights only (Keras 2's
    ``save_weights``, or ``ModelCheckpoint(save_weights_only=True)`` to a ``.h5``/``.hdf5``
    name). Reads the header only; False whenever that cannot be told (no h5py, a file still
    being written), so the load decides as before."""
    try:
        with path.open("rb") as handle:
            if handle.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                return False
        with IMPORT_LOCK:  # parallel model loads: see torch_runtime.IMPORT_LOCK
            import h5py
        # no lock: a training script saving its next checkpoint must not find the file locked
        with h5py.File(path, "r", locking=False) as h5:
            return "model_config" not in h5.attrs
    except Exception:  # ImportError, OSError, whatever a half-written file makes h5py raise
        return False


def _explain(checkpoint: Path, exc: Exception) -> LoadError:
    if isinstance(exc, ImportError):  # h5py, for .h5 files
        return MissingDependencyError(exc.name or "h5py", "keras")
    text = f"{type(exc).__name__}: {exc}".strip()
    if "safe_mode" in text:
        return LoadError(
            f"{checkpoint.name} holds Python code (a Lambda layer) that would run when loaded; "
            "refused",
            hint=UNSAFE_HINT,
        )
    if "No model config" in text or "model_config" in text:
        return LoadError(
            f"{checkpoint.name} holds weights only, not a model",
            hint="save the whole model (model.save), serve it with a --wrapper that builds the "
            "model, or pick another file with --checkpoint NAME",
        )
    if checkpoint.suffix == ".keras" and not zipfile.is_zipfile(checkpoint):
        # Keras says "file not found" (or worse) for a .keras zip cut short
        return LoadError(
            f"{checkpoint.name} is corrupt or truncated: a .keras file is a zip archive, this is not",
            hint="was it still being written? save it again, or pick another with --checkpoint NAME",
        )
    first_line = text.splitlines()[0][:300]
    return LoadError(
        f"{checkpoint.name} is not a Keras model Keras can read ({first_line})",
        hint="is it complete? (a half-written or corrupt file); pick another with --checkpoint "
        "NAME, or pass --debug for the traceback",
    )


def _input_specs(model: Any) -> list[Expected]:
    try:
        tensors = list(model.inputs or ())
    except (AttributeError, ValueError):  # a subclassed model that was never built
        return []
    specs = []
    for index, tensor in enumerate(tensors):
        shape = tuple(-1 if size is None else int(size) for size in tensor.shape)
        name = str(getattr(tensor, "name", "") or f"input_{index}")
        specs.append(Expected(name, numpy_dtype(datatype_of(str(tensor.dtype))), shape))
    return specs


def _output_names(model: Any) -> list[str]:
    try:
        tensors = list(model.outputs or ())
    except (AttributeError, ValueError):
        return []
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict) and len(struct) == len(tensors):
        return sorted(map(str, struct))  # flattened in key order
    names = getattr(model, "output_names", None)  # functional models
    if not names and len(tensors) == 1 and getattr(model, "layers", None):
        names = [model.layers[-1].name]  # Sequential
    if not names or len(names) != len(tensors):
        names = [f"output_{index}" for index in range(len(tensors))]
    return unique_names([str(name) for name in names])


def _output_specs(model: Any, names: list[str]) -> tuple[TensorSpec, ...]:
    try:
        tensors = list(model.outputs or ())
    except (AttributeError, ValueError):
        return ()
    return tuple(
        TensorSpec(name, datatype_of(str(t.dtype)), tuple(-1 if s is None else int(s) for s in t.shape))
        for name, t in zip(names, tensors, strict=False)
    )


class KerasLoader(Loader):
    name = "keras"
    patterns = ("*.keras", "*.h5", "*.hdf5", "*.hdf")
    extra = "keras"

    def recognises(self, path: Path) -> bool:
        # `model.save_weights` files hold no architecture: they cannot be served on their own.
        return super().recognises(path) and self.describe(path) is None

    def describe(self, path: Path) -> str | None:
        if path.name.endswith(".weights.h5"):
            return "Keras weights saved by save_weights, no model"
        if super().recognises(path) and path.suffix != ".keras" and _h5_without_model(path):
            return "Keras weights in HDF5, no model config"
        return None

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        if checkpoint is None:
            raise LoadError("the keras loader needs a checkpoint file")
        keras = import_keras()
        torch = import_torch("keras") if keras.backend.backend() == "torch" else None
        place = _placement(keras, torch, options.gpus)
        threads = single_threaded(torch) if torch is not None else contextlib.nullcontext()
        with threads:
            try:
                with readable_name(checkpoint) as path, place():
                    model = keras.saving.load_model(
                        path, compile=False, safe_mode=not options.trust_checkpoint
                    )
            except Exception as exc:
                raise _explain(checkpoint, exc) from exc
            inputs = _input_specs(model)
            names = _output_names(model)
            served = TensorModel(_runner(keras, torch, model, names, place), inputs)
            served.prime()
        loaded = ServedModel(
            predict=served,
            predict_named=served.named,
            platform="keras",
            checkpoint=checkpoint,
            inputs=tuple(expected.spec for expected in inputs),
            outputs=_output_specs(model, names),
        )
        if torch is not None:
            device = choose_device(torch, options.gpus)
            loaded.compiler = lambda: _compiled(torch, model, names, inputs, device, loaded)
        return loaded


Placement = Callable[[], contextlib.AbstractContextManager[Any]]


def _placement(keras: ModuleType, torch: ModuleType | None, gpus: int) -> Placement:
    """A device scope for loading and every call: Keras on torch uses a GPU whenever one
    exists, but ``--gpus 0`` means the CPU."""
    if torch is None:
        return contextlib.nullcontext
    device = choose_device(torch, gpus)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    if device == default:
        return contextlib.nullcontext
    return lambda: keras.device(device)


def _runner(
    keras: ModuleType, torch: ModuleType | None, model: Any, names: list[str], place: Placement
) -> Runner:
    no_grad = torch.inference_mode if torch is not None else contextlib.nullcontext
    convert = to_numpy if torch is not None else keras.ops.convert_to_numpy

    def run(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inference_mode and the device scope are per thread: entered on every call
        args: Any = next(iter(named.values())) if len(named) == 1 else named
        with no_grad(), place():
            outputs = model(args, training=False)
        return name_outputs(outputs, names, convert)

    return run


def _compiled(torch: ModuleType, model: Any, names: list[str], inputs: list[Expected], device: str,
              loaded: ServedModel) -> ServedModel:
    """The model as a traced, frozen TorchScript graph (plugins/loaders/tracing.py), checked
    against the loaded one (``loaded.predict``'s runner)."""
    assert isinstance(loaded.predict, TensorModel)
    eager = loaded.predict.run
    input_names = [expected.name for expected in inputs]

    def build() -> Runner:
        class Call(torch.nn.Module):  # type: ignore[name-defined]
            """The Keras model called as the loader calls it: one tensor per input, in order."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *tensors: Any) -> Any:
                args = tensors[0] if len(tensors) == 1 else dict(zip(input_names, tensors, strict=True))
                return self.model(args, training=False)

        graph = tracing.trace(torch, Call(), inputs, device)

        def run(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            tensors = [torch.from_numpy(array).to(device) for array in named.values()]
            with torch.inference_mode():
                outputs = graph(*tensors)
            return name_outputs(outputs, names, to_numpy)

        return run

    run, call_times = tracing.checked(build, eager, inputs, varied=True)
    fast = TensorModel(run, inputs)
    return replace(loaded, predict=fast, predict_named=fast.named, compiler=None,
                   compiled="torch.jit.trace, frozen", call_times=call_times)


@hookimpl
def studio_register_loaders(register: Callable[[Loader], None]) -> None:
    register(KerasLoader())
