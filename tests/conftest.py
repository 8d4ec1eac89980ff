from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keras 3 runs on the torch backend here; set before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")


@pytest.fixture
def studio_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh embedded store: $STUDIOML_HOME in a temp dir, no STUDIO_STORE/TOKEN leaking in."""
    home = tmp_path / "studioml"
    home.mkdir()
    monkeypatch.setenv("STUDIOML_HOME", str(home))
    for variable in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
        monkeypatch.delenv(variable, raising=False)
    return home


@pytest.fixture
def modeldir(studio_home: Path) -> Path:
    """The (empty) modeldir of experiment ``exp`` in the embedded store."""
    path = studio_home / "experiments" / "exp" / "modeldir"
    path.mkdir(parents=True)
    return path
