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
