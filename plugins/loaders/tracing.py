"""The compiled call path of the Keras and torch loaders: a traced, frozen TorchScript graph,
built after the model serves (``ServedModel.compiler``; core/models/compiling.py runs it) and
used only where it answers as the eager model does.

Measured here (2 cores, torch 2.13 on the CPU, the Keras MLP 784-256-10, one row per call): the
eager Keras call 445 us; ``torch.export``'s module 240 us (0.6 s to export); ``torch.compile``
(inductor) 146 us after 32 s of compiling; ``torch.jit.trace`` then ``torch.jit.freeze`` 35 us,
built in 15 ms. The traced graph wins, and it is also the one that can be built beside a serving
model: ``torch.export`` (non-strict) patches ``torch.nn.Module.__call__`` for the whole process
while it traces, so requests that other threads ran through the same model meanwhile ended up in
its trace and failed, while the jit tracer's state is per thread.

A trace records the ops one call ran: a Python branch on the input's values, or a size taken
from it, is baked in. So the graph is traced on a random batch of two rows and checked against
the eager model on two others: the priming batch (one row of zeros) and a random batch of three
rows (every axis the model leaves open at three). Each output must have the eager one's name,
shape and dtype and agree within ``TOLERANCE`` (integers and booleans exactly); otherwise the
eager model keeps serving. A TorchScript checkpoint is already a graph: it is only frozen
(weights inlined as constants, which lets the JIT fold them), and checked the same way.

torch 2.13 marks ``torch.jit.trace`` and ``torch.jit.freeze`` deprecated in favour of
``torch.compile``/``torch.export`` (the warning is silenced here): measured above, neither of
those is a replacement on the CPU yet. Should a later torch drop them, the trace fails, the
failure is logged, and the loaded model serves as before.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from plugins.loaders.signature import Expected, Runner

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
"""How far a compiled float output may be from the eager one (``np.allclose``): frozen graphs
fold and reorder float arithmetic, which moves the last bits."""

SEED = 20250601
WARM_ROWS = (1, 2, 3, 4, 8, 16, 32)
"""Batch sizes run once more after the check: TorchScript's profiling executor optimises a graph
on its first calls with a new shape (30 ms for the MLP's first), so requests do not pay that.
32: the default ``--max-batch-size``."""

TIMED_UP_TO = 0.01
"""Seconds: every batch size is warmed and timed (``ServedModel.call_times``) until a call takes
longer; the data plane runs only calls far quicker than this on the event loop
(core/dataplane/inline.py), so a large model spends no more time on it."""

CallTimes = tuple[tuple[int, float], ...]


class CompileRefused(Exception):
    """The model cannot be compiled, or its compiled version answers otherwise: the reason."""


def batch(inputs: Sequence[Expected], rows: int, seed: int | None) -> dict[str, np.ndarray]:
    """One batch for ``inputs``: every open axis (-1) ``rows`` long; zeros for ``seed`` None,
    else seeded random values of each input's dtype (0 or 1 for integers: valid indices)."""
    rng = np.random.default_rng(seed)
    named = {}
    for expected in inputs:
        shape = expected.shape if expected.shape is not None else expected.example
        if shape is None or expected.dtype is None:
            raise CompileRefused(
                f"input {expected.name!r} does not declare its shape and dtype, so a compiled "
                "model could not be checked (TorchScript: save it traced, with torch.jit.trace, "
                "or use torch.export)")
        sizes = tuple(rows if size < 0 else size for size in shape)
        if expected.shape is None:  # an example shape (TorchScript): only its batch axis varies
            sizes = (rows, *sizes[1:]) if sizes else sizes
        dtype = expected.dtype
        if seed is None:
            named[expected.name] = np.zeros(sizes, dtype)
        elif dtype.kind == "f":
            named[expected.name] = rng.standard_normal(sizes).astype(dtype)
        else:
            named[expected.name] = rng.integers(0, 2, sizes).astype(dtype)
    return named


def disagreement(eager: dict[str, np.ndarray], compiled: dict[str, np.ndarray]) -> str | None:
    """How the compiled outputs differ from the eager ones; None: they agree."""
    if list(eager) != list(compiled):
        return f"outputs {list(compiled)}, expected {list(eager)}"
    for name, want in eager.items():
        got = compiled[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"output {name!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        if want.dtype.kind in "fc":
            if not np.allclose(got, want, equal_nan=True, **TOLERANCE):
                worst = float(np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                return f"output {name!r} differs by up to {worst:.3g}"
        elif not np.array_equal(got, want):
            return f"output {name!r} differs"
    return None


def check(eager: Runner, compiled: Runner, inputs: Sequence[Expected], *, varied: bool) -> None:
    """Raise ``CompileRefused`` unless ``compiled`` answers as ``eager`` on the priming batch and
    a random one (three rows if ``varied``: a traced graph; else the priming batch's shape)."""
    batches = [("the priming batch", batch(inputs, 1, None)),
               ("a random batch", batch(inputs, 3 if varied else 1, SEED + 1))]
    for label, named in batches:
        try:
            want = eager(dict(named))
        except Exception as exc:
            raise CompileRefused(f"the loaded model refuses {label} ({type(exc).__name__}: {exc}), "
                                 "so the compiled one cannot be checked") from exc
        try:
            got = compiled(dict(named))
        except Exception as exc:
            raise CompileRefused(f"the compiled model fails on {label} ({type(exc).__name__}: "
                                 f"{str(exc).strip()[:200]})") from exc
        difference = disagreement(want, got)
        if difference is not None:
            raise CompileRefused(f"the compiled model disagrees with the loaded one on {label}: "
                                 f"{difference} (tolerance rtol={TOLERANCE['rtol']:g}, "
                                 f"atol={TOLERANCE['atol']:g})")


def warm(compiled: Runner, inputs: Sequence[Expected]) -> CallTimes:
    """Run ``compiled`` on batches of each of ``WARM_ROWS``, and time it on every size from one
    row up while it stays quick (``TIMED_UP_TO``): ``(input elements, seconds)``, the best of two
    calls after a warm one. Only a model whose inputs are fixed but for the batch axis is timed:
    then its time is its rows', and every size it is timed on has been specialised by the JIT
    (a new shape's first call took up to 11 ms for the MLP)."""
    timed = all(expected.shape is not None and all(size >= 0 for size in expected.shape[1:])
                for expected in inputs)
    times: list[tuple[int, float]] = []
    for rows in range(1, max(WARM_ROWS) + 1):
        quick = timed and (not times or times[-1][1] <= TIMED_UP_TO)
        if not quick and rows not in WARM_ROWS:
            continue
        named = batch(inputs, rows, None)
        try:
            compiled(named)
        except Exception:  # a size the model does not take (a fixed batch): requests get the 400
            break
        if quick:
            best = float("inf")
            for _ in range(2):
                began = time.perf_counter()
                compiled(named)
                best = min(best, time.perf_counter() - began)
            times.append((sum(array.size for array in named.values()), best))
    return tuple(times)


def trace(torch: ModuleType, module: Any, inputs: Sequence[Expected], device: str) -> Any:
    """``module`` (called with one tensor per input, in order) traced on a random batch of two
    rows, and frozen."""
    example = tuple(torch.from_numpy(array).to(device) for array in batch(inputs, 2, SEED).values())
    with torch.no_grad(), warnings.catch_warnings():
        # "might cause the trace to be incorrect": what ``check`` is there to catch
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # see the module's docstring
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
        return torch.jit.freeze(traced.eval())


def freeze(torch: ModuleType, module: Any) -> Any:
    """A TorchScript module frozen: its weights inlined as constants (the module is not changed:
    freezing works on a copy)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(module.eval())


def checked(build: Callable[[], Runner], eager: Runner, inputs: Sequence[Expected], *,
            varied: bool) -> tuple[Runner, CallTimes]:
    """The runner ``build`` makes, once it answers as ``eager`` does (``check``) and is warm,
    with its times on the warm-up batches (``warm``)."""
    if not inputs:
        raise CompileRefused("the model does not declare its inputs, so it cannot be checked")
    try:
        compiled = build()
    except CompileRefused:
        raise
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise CompileRefused(f"tracing failed ({type(exc).__name__}: "
                             f"{lines[0][:200] if lines else ''})") from exc
    check(eager, compiled, inputs, varied=varied)
    return compiled, warm(compiled, inputs)
