"""Pipelines for wrapper authors: ``ModelPipe`` and ``resize_to_model_input``, as in Studio.ML.

::

    pipe = model_util.ModelPipe()
    pipe.add("fetch_url", num_workers=4, timeout=5)     # a named stage from a plugin
    pipe.add("decode_image")                            # no options: same stage, same worker
    pipe.add(model_util.resize_to_model_input(model))
    pipe.add(model, num_workers=1, batch_size=32, batcher=np.vstack)
    pipe({"cat": "http://...", "dog": "http://..."})   # -> {"cat": array, "dog": array}

The engine (workers, deadlines, batching, order) is ``core.pipe.engine``; this module adds what a user
hands to ``add`` beyond plain functions: stage names registered by plugins, Keras models (called
through ``predict`` on numpy) and torch modules (called under ``inference_mode``).
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from core.errors import ConfigurationError, LoadError, MissingDependencyError
from core.host import PluginHost
from core.pipe.engine import Pipe, StageOptions, is_not_none

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ModelPipe", "StageOptions", "is_not_none", "resize_to_model_input", "to_model_input"]

_default_host: PluginHost | None = None
_host_lock = threading.Lock()


def default_host() -> PluginHost:
    """The host named stages come from when a pipe is given none: built on first use, once."""
    global _default_host
    with _host_lock:
        if _default_host is None:
            _default_host = PluginHost()
        return _default_host


def _defined_in(obj: object, *prefixes: str) -> bool:
    return any(
        cls.__module__ == prefix or cls.__module__.startswith(prefix + ".")
        for cls in type(obj).__mro__
        for prefix in prefixes
    )


def is_keras_model(obj: object) -> bool:
    return _defined_in(obj, "keras") and callable(getattr(obj, "predict", None))


def is_torch_module(obj: object) -> bool:
    return any(cls.__module__ == "torch.nn.modules.module" for cls in type(obj).__mro__)


def _keras_stage(model: Any) -> Callable[[Any], Any]:
    def keras_predict(batch: Any) -> Any:
        return model.predict(np.asarray(batch), verbose=0)

    keras_predict.__name__ = f"keras:{getattr(model, 'name', type(model).__name__)}"
    return keras_predict


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if isinstance(value, list | tuple):
        return type(value)(_to_numpy(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_numpy(item) for key, item in value.items()}
    return value


def _torch_stage(module: Any) -> Callable[[Any], Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover - a torch module exists, so torch does
        raise MissingDependencyError("torch", "torch") from None
    module.eval()  # serving: dropout off, batch-norm statistics frozen
    parameter = next(iter(module.parameters()), None)

    def torch_forward(batch: Any) -> Any:
        tensor = torch.as_tensor(np.asarray(batch))
        if parameter is not None:
            dtype = parameter.dtype if tensor.is_floating_point() else tensor.dtype
            tensor = tensor.to(device=parameter.device, dtype=dtype)
        with torch.inference_mode():  # thread-local, so safe in a worker
            return _to_numpy(module(tensor))

    torch_forward.__name__ = f"torch:{type(module).__name__}"
    return torch_forward


def as_stage(func: Any) -> Callable[[Any], Any]:
    """What ``add`` calls: a Keras model through ``predict``, a torch module under
    ``inference_mode`` (numpy in, numpy out), anything else callable as it is."""
    if is_keras_model(func):  # before torch: Keras 3 models on torch are torch modules too
        return _keras_stage(func)
    if is_torch_module(func):
        return _torch_stage(func)
    return func


class ModelPipe(Pipe):
    """A ``dict -> dict`` pipeline of stages with workers, deadlines and batching.

    ``host``: where named stages come from (default: a host with the installed plugins, built
    the first time a name is used).
    """

    def __init__(self, host: PluginHost | None = None) -> None:
        super().__init__()
        self._host = host

    def stage(self, name: str, **params: Any) -> Callable[[Any], Any]:
        """The stage registered as ``name``, with keyword ``params`` bound (``fetch_url``,
        ``decode_image``, ``resize_to_model_input``; ``studio-plug plugins --all`` lists them)."""
        stages = (self._host or default_host()).stages()
        if name not in stages:
            known = ", ".join(sorted(stages)) or "none"
            raise ConfigurationError(f"no pipe stage named {name!r}", hint=f"stages installed: {known}")
        func = functools.partial(stages[name], **params) if params else stages[name]
        try:
            inspect.signature(func).bind(None)
        except TypeError as exc:
            raise ConfigurationError(
                f"pipe stage {name!r} cannot take one item as it is: {exc}",
                hint=f"bind its parameters: pipe.add(pipe.stage({name!r}, NAME=VALUE), ...)",
            ) from None
        except ValueError:  # no signature (a builtin): trust it
            pass
        return func

    def add(
        self,
        func: Callable[..., Any] | str,
        num_workers: int = 0,
        timeout: float | None = None,
        batch_size: int = 1,
        batcher: Callable[[list[Any]], Any] | None = None,
        unbatcher: Callable[[Any], Iterable[Any]] | None = None,
        filterf: Callable[[Any], bool] | None = None,
    ) -> Self:
        """Add a function, a Keras model, a torch module or a stage name; returns the pipe.

        No options: ``func`` runs right after the current stage's functions, in the same
        worker. Any option: a new stage with its own workers (``num_workers``, at least one),
        a per-item ``timeout`` in seconds (late items give ``None``), batches of ``batch_size``
        put together by ``batcher`` (default: a list) and split by ``unbatcher`` (default: the
        first axis), and ``filterf`` (default: ``x is not None``) choosing which items it takes.
        """
        stage = self.stage(func) if isinstance(func, str) else as_stage(func)
        return super().add(stage, num_workers, timeout, batch_size, batcher, unbatcher, filterf)


# --- images -------------------------------------------------------------------------------


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("Pillow", "images") from None
    return Image


def model_input_shape(model: Any) -> tuple[int | None, ...]:
    """The shape of one input of ``model``, without the batch axis.

    Keras: ``model.input_shape``. Torch: an ``input_shape`` attribute (no batch axis) if the
    module has one, else what its first layer tells (``Linear``: flat features; ``Conv2d``: channels first,
    any height and width)."""
    try:
        shape = getattr(model, "input_shape", None)
    except Exception:  # a Keras model that is not built yet
        shape = None
    if shape is None and is_torch_module(model) and not is_keras_model(model):
        for layer in model.modules():
            if hasattr(layer, "in_features"):
                return (int(layer.in_features),)
            if hasattr(layer, "in_channels"):
                return (int(layer.in_channels), None, None)
    if shape is None:
        raise LoadError(
            f"cannot tell the input shape of {type(model).__name__}",
            hint="pass it: resize_to_model_input(model, input_shape=(C, H, W)) (no batch axis)",
        )
    if isinstance(shape, list):
        raise LoadError("resize_to_model_input needs a model with one input, this one has several")
    dims = tuple(None if dim is None or dim < 0 else int(dim) for dim in shape)
    return dims[1:] if is_keras_model(model) else dims  # Keras shapes start with the batch axis


_CHANNELS = (1, 3, 4)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _layout(shape: tuple[int | None, ...], channels_first: bool) -> tuple[int | None, int | None, int, str]:
    """``(height, width, channels, kind)``; kind: ``hw`` (grey, no channel axis), ``hwc``,
    ``chw`` or ``flat`` (an image flattened channels-last)."""
    if len(shape) == 3:
        first, last = shape[0] in _CHANNELS, shape[2] in _CHANNELS
        if first and (channels_first or not last):
            return shape[1], shape[2], int(shape[0]), "chw"  # type: ignore[arg-type]
        if last:
            return shape[0], shape[1], int(shape[2]), "hwc"  # type: ignore[arg-type]
    if len(shape) == 2:
        return shape[0], shape[1], 1, "hw"
    if len(shape) == 1 and shape[0]:
        for channels in (1, 3):
            side = math.isqrt(shape[0] // channels)
            if shape[0] % channels == 0 and side * side * channels == shape[0]:
                return side, side, channels, "flat"
    raise LoadError(
        f"model input shape {shape} does not look like an image",
        hint="pass input_shape=(H, W, C) or (C, H, W) to resize_to_model_input",
    )


def to_model_input(image: Any, *, model: Any, input_shape: Iterable[int | None] | None = None,
                   channels_first: bool | None = None) -> np.ndarray:
    """``image`` (Pillow image or uint8 array) as a float32 array in [0, 1] shaped for the
    model's input, with a batch axis of 1 so that ``np.vstack`` batches several."""
    shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
    if channels_first is None:  # torch's convention is channels first, Keras' channels last
        channels_first = is_torch_module(model) and not is_keras_model(model)
    height, width, channels, kind = _layout(shape, channels_first)
    pil = _pillow()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8, not {image.dtype}; or pass a Pillow image")
        image = pil.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, pil.Image):
        raise TypeError(f"resize_to_model_input takes a Pillow image or a uint8 array, "
                        f"not {type(image).__name__}")
    image = image.convert(_MODES[channels])
    size = (width or image.width, height or image.height)
    if size != image.size:
        image = image.resize(size, pil.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if channels == 1 and kind in ("hwc", "chw"):
        array = array[..., None]
    if kind == "chw":
        array = array.transpose(2, 0, 1)
    elif kind == "flat":
        array = array.reshape(-1)
    return array[None, ...]


def resize_to_model_input(
    model: Any, input_shape: Iterable[int | None] | None = None, channels_first: bool | None = None
) -> Callable[[Image.Image | np.ndarray], np.ndarray]:
    """A stage turning an image into the input ``model`` expects (see ``to_model_input``).

    The shape is read once, here: a model without a readable input shape fails at once."""
    shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
    if channels_first is None:
        channels_first = is_torch_module(model) and not is_keras_model(model)
    _layout(shape, channels_first)  # fail now, not per item

    def resize_to_model_input(image: Image.Image | np.ndarray) -> np.ndarray:
        return to_model_input(image, model=model, input_shape=shape, channels_first=channels_first)

    return resize_to_model_input
