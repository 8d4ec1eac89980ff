"""Running torch safely for the torch and Keras loaders: import, device, threads, safe loads.

Imported by the loaders at load time only; ``torch`` itself is imported inside the functions so
that ``studio-plug --help`` and the identity model never pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from studio_plugins import MissingDependencyError

log = logging.getLogger("studio_plugins.loaders.torch")

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


# Several models load in parallel threads; torch (and Keras, which imports it) does not
# survive being imported by two threads at once ("torch.utils is not installed"), so the
# frameworks are imported under one lock.
IMPORT_LOCK = threading.RLock()
LOAD_LOCK = threading.Lock()


def import_torch(extra: str = "torch") -> ModuleType:
    with IMPORT_LOCK:
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", extra) from None
    return torch


def choose_device(torch: ModuleType, gpus: int) -> str:
    """``cuda`` when GPUs were asked for and one exists, else ``cpu`` (and say why)."""
    if gpus > 0:
        if torch.cuda.is_available():
            return "cuda"
        log.warning("--gpus %d but no CUDA device is available; running on the CPU", gpus)
    return "cpu"


@contextlib.contextmanager
def single_threaded(torch: ModuleType) -> Iterator[None]:
    """Load and prime with one intra-op thread.

    Once torch has run a multi-threaded op, a forked child that runs torch with several threads
    hangs (the OpenMP pool is not fork-safe); worker processes fork after the model is loaded.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def weights_only_loads(trusted: bool) -> Iterator[None]:
    """Unless ``trusted``, every ``torch.load`` inside runs with ``weights_only=True``.

    Some readers (``torch.export.load``) call ``torch.load(weights_only=False)`` on pickled parts
    of an archive; torch's own switch makes those refuse anything but tensors and containers.
    One load at a time: the switch is process-wide, and ``torch.export.load`` keeps a global
    deserializer (two overlapping loads failed with "_CURRENT_DESERIALIZER is already set").
    """
    with LOAD_LOCK:
        if trusted:
            yield
            return
        saved = {name: os.environ.pop(name, None) for name in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
        os.environ[_FORCE_WEIGHTS_ONLY] = "1"
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (any device) as a numpy array; anything else through ``np.asarray``."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
