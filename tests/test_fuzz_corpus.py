"""Every input that ever crashed or hung a parser (``tests/corpus/<target>/``) and every seed
(``fuzz/seeds/<target>/``), replayed through its fuzz target: each must finish quickly without
raising (a client error is swallowed by the target; anything else is a bug)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fuzz import CORPUS, SEEDS, load, targets

BOUND = 2.0
"""Seconds one input may take: the hangs in the corpus took minutes or forever."""


def inputs() -> list[tuple[str, Path]]:
    return [
        (target, path)
        for target in targets()
        for folder in (CORPUS / target, SEEDS / target)
        if folder.is_dir()
        for path in sorted(folder.iterdir())
        if path.is_file()
    ]


def test_every_target_has_seeds_and_a_corpus() -> None:
    assert set(targets()) >= {"v2_json", "v2_binary", "v2_struct", "npz_codec", "json_codec"}
    for target in targets():
        assert any((SEEDS / target).iterdir()), f"fuzz/seeds/{target}/ is empty"
    found = {target for target, _ in inputs()}
    assert found == set(targets())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("target", "path"), inputs(), ids=lambda value: getattr(value, "name", value))
def test_replays_without_raising_and_in_time(target: str, path: Path) -> None:
    one_input = load(target)
    data = path.read_bytes()
    started = time.perf_counter()
    one_input(data)
    elapsed = time.perf_counter() - started
    assert elapsed < BOUND, f"{target}/{path.name} took {elapsed:.2f} s"
