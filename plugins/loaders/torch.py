"""PyTorch checkpoints: TorchScript archives (``*.pt``, ``*.pth``) and ``torch.export`` programs
(``*.pt2``).

A ``.pt``/``.pth`` written by ``torch.save`` (a ``state_dict`` or a pickled module) is not a
model without its Python class: it is refused with a pointer to ``--wrapper``, and a state_dict
(told from its pickle's opcodes, never run: torch_pickle.py) is not even picked as a checkpoint.
A pickled module is loaded (``weights_only=False``, which runs code from the file) only with
``--trust-checkpoint``; every other ``torch.load`` here, including those inside
``torch.export.load``, runs with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
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
    output_specs,
)
from plugins.loaders.torch_pickle import saved_tensors_only
from plugins.loaders.torch_runtime import (
    choose_device,
    import_torch,
    single_threaded,
    to_numpy,
    weights_only_loads,
)
from studio_plugins import (
    Loader,
    LoadError,
    LoadOptions,
    ModelError,
    ServedModel,
    TensorSpec,
    hookimpl,
)

log = logging.getLogger("studio_plugins.loaders.torch")

WRAPPER_HINT = (
    "save the model with torch.jit.save or torch.export.save, or serve this file with "
    "--wrapper FILE whose create_model(modeldir) builds the model and loads it"
)


def _archive_folders(path: Path) -> set[str]:
    """The entries one level into a zip archive (``code``, ``traced_inputs.pkl``, ...)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {parts[1] for parts in (name.split("/") for name in archive.namelist())
                    if len(parts) > 1}
    except (zipfile.BadZipFile, OSError):
        return set()


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; ``torch.save`` output has none."""
    return "code" in _archive_folders(path)


def _shape_of(value: Any) -> tuple[int, ...] | None:
    """A traced tensor's shape with symbolic (dynamic) sizes as -1."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(size if isinstance(size, int) else -1 for size in shape)


def _exported(
    torch: ModuleType, path: Path, options: LoadOptions
) -> tuple[Any, list[Expected], list[TensorSpec]]:
    with weights_only_loads(options.trust_checkpoint):
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            if "weights_only" in str(exc) or "Weights only" in str(exc):
                raise LoadError(
                    f"{path.name} holds pickled Python objects that would run code when loaded; "
                    "refused",
                    hint="if you trust this checkpoint, serve it with --trust-checkpoint",
                ) from exc
            raise LoadError(f"{path.name} is not a torch.export program torch can read ({exc})",
                            hint="was it written by torch.export.save? is it complete?") from exc
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val") if name in placeholders else None
        dtype = numpy_dtype(datatype_of(getattr(value, "dtype", None)))
        inputs.append(Expected(name, dtype, _shape_of(value)))
    outputs = []
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    results = output_node.args[0] if output_node.args else ()
    for index, node in enumerate(results if isinstance(results, list | tuple) else (results,)):
        value = getattr(node, "meta", {}).get("val")
        outputs.append(TensorSpec(f"output_{index}", datatype_of(getattr(value, "dtype", None)),
                                  _shape_of(value) or (-1,)))
    return program.module(), inputs, outputs


def _jit_load(torch: ModuleType, path: Path, device: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
        if "traced_inputs.pkl" in _archive_folders(path):
            # A traced module keeps the inputs it was traced with (torch >= 2.0); torch's
            # (private) switch puts their dtypes and shapes on the graph's inputs. Without it,
            # or should it fail, the module loads as a scripted one would: names only.
            try:
                return torch.jit.load(str(path), map_location=device, _restore_shapes=True)
            except Exception as exc:
                log.debug("%s: traced input shapes not restored (%s)", path.name, exc)
        try:
            return torch.jit.load(str(path), map_location=device)
        except Exception as exc:
            raise LoadError(f"{path.name} is not a TorchScript archive torch can read ({exc})",
                            hint="is it complete? pick another file with --checkpoint NAME") from exc


def _scripted(torch: ModuleType, path: Path, device: str) -> tuple[Any, list[Expected]]:
    module = _jit_load(torch, path, device)
    module.eval()
    try:
        arguments = module.forward.schema.arguments[1:]  # [0] is self
        graph_inputs = list(module.graph.inputs())[1:]
    except (AttributeError, RuntimeError):
        return module, []
    # TorchScript knows argument names; dtypes and shapes only where it was traced (an example
    # shape, not a limit: a traced convolution may take other image sizes)
    inputs = []
    for argument, value in zip(arguments, graph_inputs, strict=False):
        if argument.default_value is not None:
            continue
        kind = value.type()
        if isinstance(kind, torch.TensorType) and kind.dtype() is not None and kind.sizes() is not None:
            dtype = numpy_dtype(datatype_of(kind.dtype()))
            inputs.append(Expected(argument.name, dtype, example=tuple(kind.sizes())))
        else:
            inputs.append(Expected(argument.name))
    return module, inputs


def _declared_outputs(module: Any) -> tuple[TensorSpec, ...]:
    """Output names from a TorchScript schema (one for a pickled module, which has none), their
    dtypes and shapes unknown (``UNKNOWN``): for a module that could not be primed."""
    try:
        returned = module.forward.schema.returns[0].type
        count = len(returned.elements()) if returned.kind() == "TupleType" else 1
    except (AttributeError, IndexError, RuntimeError):
        count = 1
    return tuple(TensorSpec(f"output_{index}") for index in range(count))


def _pickled(torch: ModuleType, path: Path, options: LoadOptions, device: str) -> Any:
    """A ``torch.save`` file: refuse a state_dict; a pickled module only when trusted."""
    with path.open("rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip (PK), its legacy format a pickle (PROTO, 0x80); torch's own error
    # for anything else says "Weights only load failed", which reads like a pickled module
    if head != b"PK" and head[:1] != b"\x80":
        raise LoadError(f"{path.name} is not a TorchScript, torch.export or torch.save file "
                        f"(it starts with {head!r})",
                        hint="is it the right file? pick another with --checkpoint NAME")
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not (isinstance(exc, pickle.UnpicklingError) and "Weights only" in str(exc)):
            raise LoadError(f"{path.name} is not a checkpoint torch can read ({exc})",
                            hint="is it complete? pick another file with --checkpoint NAME") from exc
        if not options.trust_checkpoint:
            raise LoadError(
                f"{path.name} is a pickled Python object (a whole module saved with torch.save?): "
                "it needs its class, and loading it runs code from the file",
                hint=WRAPPER_HINT + "; or, only if you trust the file and its class is importable, "
                "pass --trust-checkpoint",
            ) from None
        try:
            content = torch.load(str(path), map_location=device, weights_only=False)
        except Exception as exc2:
            raise LoadError(
                f"{path.name}: unpickling failed ({type(exc2).__name__}: {exc2})",
                hint="the module's class must be importable here (same name and module as when "
                "it was saved); " + WRAPPER_HINT,
            ) from exc2
        if isinstance(content, torch.nn.Module):
            return content.eval()
        raise LoadError(f"{path.name} holds a {type(content).__name__}, not a torch module",
                        hint=WRAPPER_HINT) from None
    kind = "a state_dict (weights without the model's class)" if isinstance(content, dict) else (
        f"a {type(content).__name__}")
    raise LoadError(f"{path.name} is {kind}: it cannot be served on its own", hint=WRAPPER_HINT)


def _float_dtype(torch: ModuleType, module: Any) -> np.dtype | None:
    """The dtype of the module's floating-point weights (float32, mostly)."""
    for parameter in getattr(module, "parameters", list)():
        if parameter.is_floating_point():
            try:
                return np.dtype(str(parameter.dtype).removeprefix("torch."))
            except TypeError:  # bfloat16: numpy has no such dtype
                return None
    return None


def _runner(torch: ModuleType, module: Any, device: str, float_dtype: np.dtype | None) -> Runner:
    """``float_dtype``: where the inputs' dtypes are not declared (TorchScript), floating-point
    inputs are cast to the weights' dtype, so a JSON body's float64 meets float32 weights."""

    def tensor(array: np.ndarray) -> Any:
        if float_dtype is not None and array.dtype.kind == "f" and array.dtype != float_dtype:
            array = array.astype(float_dtype)
        return torch.from_numpy(array).to(device)

    def run(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = [tensor(array) for array in named.values()]
            try:
                outputs = module(*args)
            except RuntimeError as exc:
                # TorchScript puts its whole interpreter traceback in the message; the cause is last
                lines = [line for line in str(exc).splitlines() if line.strip()]
                raise ModelError(f"model failed: {lines[-1] if lines else exc}") from exc
        return name_outputs(outputs, (), to_numpy)

    return run


class TorchLoader(Loader):
    name = "torch"
    patterns = ("*.pt", "*.pth", "*.pt2")
    extra = "torch"

    def recognises(self, path: Path) -> bool:
        # a state_dict is weights without the model's class: never picked as a checkpoint
        return super().recognises(path) and self.describe(path) is None

    def describe(self, path: Path) -> str | None:
        if path.suffix in (".pt", ".pth") and not is_torchscript(path) and saved_tensors_only(path):
            return "a torch state_dict: weights without the model's class"
        return None

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        if checkpoint is None:
            raise LoadError("the torch loader needs a checkpoint file")
        torch = import_torch()
        device = choose_device(torch, options.gpus)
        outputs: tuple[TensorSpec, ...] | None = None
        with single_threaded(torch):
            if checkpoint.suffix == ".pt2":
                module, inputs, exported = _exported(torch, checkpoint, options)
                outputs = tuple(exported)
                if device != "cpu":
                    module = module.to(device)
            elif is_torchscript(checkpoint):
                module, inputs = _scripted(torch, checkpoint, device)
            else:
                module, inputs = _pickled(torch, checkpoint, options, device), []
            declared = bool(inputs) and all(expected.dtype is not None for expected in inputs)
            float_dtype = None if declared else _float_dtype(torch, module)
            served = TensorModel(_runner(torch, module, device, float_dtype), inputs)
            primed = served.prime()
        if outputs is None:  # TorchScript and pickled modules: the priming call says what they answer
            outputs = output_specs(primed) if primed else _declared_outputs(module)
        log.info("torch model on %s", device)
        loaded = ServedModel(
            predict=served,
            predict_named=served.named,
            platform="torch",
            checkpoint=checkpoint,
            inputs=tuple(expected.spec for expected in inputs),
            outputs=outputs,
        )
        loaded.compiler = lambda: _compiled(torch, module, inputs, device, float_dtype, loaded)
        return loaded


def _compiled(torch: ModuleType, module: Any, inputs: list[Expected], device: str,
              float_dtype: np.dtype | None, loaded: ServedModel) -> ServedModel:
    """A TorchScript module frozen; any other (a torch.export program's module, a pickled one)
    traced and frozen (plugins/loaders/tracing.py); checked against the loaded one."""
    assert isinstance(loaded.predict, TensorModel)
    scripted = isinstance(module, torch.jit.ScriptModule)

    def build() -> Runner:
        graph = tracing.freeze(torch, module) if scripted else tracing.trace(torch, module, inputs, device)
        return _runner(torch, graph, device, float_dtype)

    run, call_times = tracing.checked(build, loaded.predict.run, inputs, varied=not scripted)
    fast = TensorModel(run, inputs)
    # A scripted module may branch and loop on its inputs' values, so its time is not its
    # shape's: only a traced graph's calls may run on the event loop (core/dataplane/inline.py).
    return replace(loaded, predict=fast, predict_named=fast.named, compiler=None,
                   compiled="torch.jit.freeze" if scripted else "torch.jit.trace, frozen",
                   call_times=() if scripted else call_times)


@hookimpl
def studio_register_loaders(register: Callable[[Loader], None]) -> None:
    register(TorchLoader())


@hookimpl
def studio_configure_threads(threads: int) -> None:
    """Intra-op threads for torch (and Keras on it): set now if torch is loaded, else through
    the environment, so that a parent that forks workers never runs torch multi-threaded."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(threads)
