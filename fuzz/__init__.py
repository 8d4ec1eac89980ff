"""Coverage-guided fuzzing of the parsers of client data (a dev tool, like ``bench/``).

A target is a module ``fuzz/<target>.py`` defining ``one_input(data: bytes) -> None``: it feeds
the bytes to one parser the way the server does and swallows only that parser's client errors
(``CLIENT_ERRORS``); anything else it raises is a bug. Where it can, it also checks what came
out (an echo re-encodes and decodes the same values). ``python -m fuzz`` runs a target under
atheris (libFuzzer); ``tests/test_fuzz_corpus.py`` replays every input that ever crashed or hung
one (``tests/corpus/<target>/``) and every seed (``fuzz/seeds/<target>/``). See fuzz/README.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from studio_plugins import BadRequest, PayloadTooLarge

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEEDS = HERE / "seeds"
CORPUS = ROOT / "tests" / "corpus"
LIMIT = 1 << 20
"""The decoded-size limit (--max-body) the targets decode with: small, so that the fuzzer
reaches the size checks and no input it tries can hold much memory."""
CLIENT_ERRORS: tuple[type[Exception], ...] = (BadRequest, PayloadTooLarge)
"""What a parser may answer a client with (a 400, a 413); a target whose parser can also
refuse in another way (a 415) adds that error to its own tuple."""
_NOT_TARGETS = {"__init__", "__main__", "instrument", "compare", "draw"}


def targets() -> list[str]:
    """Every target's name: the modules of this package that are not its machinery."""
    return sorted(path.stem for path in HERE.glob("*.py") if path.stem not in _NOT_TARGETS)


def load(name: str) -> Callable[[bytes], None]:
    """The ``one_input`` of target ``name``."""
    if name not in targets():
        raise SystemExit(f"no fuzz target {name!r}; one of {', '.join(targets())}")
    module = importlib.import_module(f"fuzz.{name}")
    one_input: Callable[[bytes], None] = module.one_input
    return one_input
