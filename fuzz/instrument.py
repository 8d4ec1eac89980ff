"""Coverage for the parsers only: ``python -m fuzz`` turns ``ENABLED`` on before it imports a
target, and the target imports its parser inside ``parsers()``. Replaying a corpus in the
tests imports the same target uninstrumented."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

ENABLED = False


@contextlib.contextmanager
def parsers() -> Iterator[None]:
    """atheris's import hook around the block when fuzzing: the modules first imported inside
    it (the parser's own, not numpy or the server's core, imported before) report coverage."""
    if not ENABLED:
        yield
        return
    import atheris

    with atheris.instrument_imports(include=["plugins"]):
        yield


def loaded(*names: str) -> None:
    """Coverage for modules imported before fuzzing could hook them (core's wire codec comes with
    ``studio_plugins``): their functions and methods are instrumented in place, when fuzzing."""
    if not ENABLED:
        return
    import importlib
    import inspect

    import atheris

    for name in names:
        module = importlib.import_module(name)
        for value in vars(module).values():
            members = vars(value).values() if inspect.isclass(value) and value.__module__ == name else [value]
            for member in members:
                function = getattr(member, "__func__", member)  # staticmethods too
                if inspect.isfunction(function) and function.__module__ == name:
                    atheris.instrument_func(function)
