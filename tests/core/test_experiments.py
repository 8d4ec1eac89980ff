"""Experiment keys, the embedded store, and key -> model assembly rules that need no framework."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import ConfigurationError, ExperimentError, LoadError, StoreError
from core.models.assembly import load_model
from core.models.experiments import open_store, studio_home, validate_key
from core.types import ServeOptions
from studio_plugins import get_model_directory
from studio_plugins.testing import make_host


@pytest.mark.parametrize("key", ["exp", "1510000000_abc-def.v2", "A_b", "_private"])
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "../x", "..", ".", "/abs", "a/b", "a\\b", ".hidden", "x" * 201, "a b", "ké"]
)
def test_keys_that_could_escape_the_store_are_refused(key: str) -> None:
    with pytest.raises(ExperimentError, match="invalid experiment key"):
        validate_key(key)


def test_home_defaults_to_dot_studioml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUDIOML_HOME", raising=False)
    assert studio_home() == Path.home() / ".studioml"


def test_get_model_directory_creates_the_modeldir(studio_home: Path) -> None:
    path = Path(get_model_directory("train-1"))
    assert path == studio_home / "experiments" / "train-1" / "modeldir"
    assert path.is_dir()
    with pytest.raises(ExperimentError):
        get_model_directory("../escape")


def test_push_copies_files_and_keeps_mtimes(studio_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "ckpts"
    source.mkdir()
    (source / "a.h5").write_bytes(b"1")
    os.utime(source / "a.h5", (1_000_000, 1_000_000))
    store = open_store(make_host())
    assert store.push("exp", source) == 1
    copied = studio_home / "experiments" / "exp" / "modeldir" / "a.h5"
    assert copied.read_bytes() == b"1" and copied.stat().st_mtime == 1_000_000
    [info] = store.experiments()
    assert info.key == "exp" and [f.name for f in info.files] == ["a.h5"]


def test_push_takes_a_single_file(studio_home: Path, tmp_path: Path) -> None:
    (tmp_path / "b.h5").write_bytes(b"2")
    os.utime(tmp_path / "b.h5", (2_000_000, 2_000_000))
    store = open_store(make_host())
    assert store.push("exp", tmp_path / "b.h5") == 1
    copied = studio_home / "experiments" / "exp" / "modeldir" / "b.h5"
    assert copied.read_bytes() == b"2" and copied.stat().st_mtime == 2_000_000
    with pytest.raises(StoreError, match="neither a file nor a directory"):
        store.push("exp", tmp_path / "missing.h5")


def test_store_url_picks_the_store_by_scheme(tmp_path: Path, studio_home: Path) -> None:
    other = tmp_path / "elsewhere"
    store = open_store(make_host(), other.as_uri())
    assert store.url == other.resolve().as_uri()
    with pytest.raises(ConfigurationError, match="no experiment store"):
        open_store(make_host(), "gopher://x/y")


def test_store_env_variable_is_the_default(tmp_path: Path, studio_home: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_STORE", (tmp_path / "env-store").as_uri())
    assert open_store(make_host()).url.endswith("/env-store")


def test_unknown_experiment_is_a_clear_error(studio_home: Path) -> None:
    with pytest.raises(ExperimentError, match="no experiment 'nope'") as caught:
        load_model(make_host(), ServeOptions(keys=("nope",)), "nope")
    assert "experiments push nope" in (caught.value.hint or "")


def test_a_typo_in_the_key_suggests_the_nearest_one(studio_home: Path) -> None:
    for key in ("mnist-cnn", "cifar10"):
        (studio_home / "experiments" / key / "modeldir").mkdir(parents=True)
    with pytest.raises(ExperimentError, match=r"no experiment 'mnist-cn' .*; did you mean 'mnist-cnn'") \
            as caught:
        load_model(make_host(), ServeOptions(keys=("mnist-cn",)), "mnist-cn")
    assert "experiments push mnist-cn" in (caught.value.hint or "")
    with pytest.raises(ExperimentError) as unrelated:  # nothing near: no suggestion
        load_model(make_host(), ServeOptions(keys=("resnet",)), "resnet")
    assert "did you mean" not in unrelated.value.message


def test_empty_modeldir_serves_identity_and_says_so(
    modeldir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_model(make_host(), ServeOptions(keys=("exp",)), "exp")
    assert model.platform == "identity"
    assert "no checkpoints" in caplog.text and "identity" in caplog.text


def test_files_no_loader_serves_are_an_error_that_names_them(modeldir: Path) -> None:
    # the identity model would echo every request with a 200 and hide the mistake
    (modeldir / "notes.txt").write_text("hi")
    (modeldir / "logs").mkdir()
    (modeldir / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(LoadError) as nothing:
        load_model(make_host(), ServeOptions(keys=("exp",)), "exp")
    message = nothing.value.message
    assert message.startswith(f"no model to serve in {modeldir}: it holds ")
    assert "notes.txt (unrecognised)" in message and "logs (a folder)" in message
    assert ".DS_Store" not in message
    assert "--wrapper FILE whose create_model(modeldir) builds the model" in message
    assert "--loader identity" in (nothing.value.hint or "")
    # asked for, the identity model is still there
    forced = load_model(make_host(), ServeOptions(keys=("exp",), loader="identity"), "exp")
    assert forced.platform == "identity"


def test_only_hidden_files_still_serve_identity(modeldir: Path) -> None:
    (modeldir / ".gitkeep").write_bytes(b"")
    assert load_model(make_host(), ServeOptions(keys=("exp",)), "exp").platform == "identity"


def test_a_long_list_of_files_is_cut_short(modeldir: Path) -> None:
    for index in range(12):
        (modeldir / f"f{index:02d}.txt").write_text("x")
    with pytest.raises(LoadError, match=r"\(unrecognised\) and 4 more; serve it with --wrapper"):
        load_model(make_host(), ServeOptions(keys=("exp",)), "exp")


def test_a_missing_store_directory_is_named(tmp_path: Path, studio_home: Path) -> None:
    store = open_store(make_host(), (tmp_path / "nowhere").as_uri())
    with pytest.raises(ExperimentError, match=r"store directory .* does not exist"):
        store.modeldir("exp")
