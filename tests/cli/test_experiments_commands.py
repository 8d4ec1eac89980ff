"""`studio-plug experiments ls KEY` (one experiment's files: loader, size, time, the one `serve`
loads marked) and `experiments push KEY FILE`, in process through click, on real checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from studio_plugins.cli import build_cli
from studio_plugins.testing import make_host

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

DAY = 86_400
T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_cli(make_host()), list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def rows(out: str) -> dict[str, list[str]]:
    """FILE -> [marker, loader, size, unit, date, time, kind...] of the listing."""
    table = {}
    for line in out.splitlines()[1:]:
        marker = "*" if line.startswith("*") else ""
        name, *rest = line.lstrip("* ").split()
        table[name] = [marker, *rest]
    return table


def touch(path: Path, when: float) -> Path:
    os.utime(path, (when, when))
    return path


@pytest.fixture
def checkpoints(modeldir: Path) -> Path:
    """A whole Keras model (oldest), Keras weights, a torch state_dict (newest) and a note."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.save(modeldir / "model.keras")
    touch(modeldir / "model.keras", T0)
    model.save_weights(modeldir / "epoch9.weights.h5")
    touch(modeldir / "epoch9.weights.h5", T0 + DAY)
    torch.save(torch.nn.Linear(3, 2).state_dict(), modeldir / "weights.pt")
    touch(modeldir / "weights.pt", T0 + 2 * DAY)
    (modeldir / "notes.txt").write_text("lr=0.1\n")
    touch(modeldir / "notes.txt", T0 + 3 * DAY)
    return modeldir


def test_ls_key_lists_each_file_and_marks_what_serve_loads(checkpoints: Path) -> None:
    code, out, err = cli("experiments", "ls", "exp")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["FILE", "LOADER", "SIZE", "MODIFIED", "(UTC)"]
    names = [line.lstrip("* ").split()[0] for line in out.splitlines()[1:]]
    assert names == ["notes.txt", "weights.pt", "epoch9.weights.h5", "model.keras"]  # newest first
    table = rows(out)
    # the newest file is not the served one: only model.keras is a model a loader serves
    assert table["model.keras"][:2] == ["*", "keras"]
    assert table["model.keras"][4:6] == ["2023-11-14", "22:13:20"]
    size = (checkpoints / "model.keras").stat().st_size
    assert " ".join(table["model.keras"][2:4]) == f"{size / 1000:.1f} KB"
    assert table["notes.txt"][:4] == ["", "none", "7", "B"]
    assert table["weights.pt"][:2] == ["", "none"]
    assert " ".join(table["weights.pt"][6:]) == "a torch state_dict: weights without the model's class"
    assert " ".join(table["epoch9.weights.h5"][6:]) == "Keras weights saved by save_weights, no model"
    assert "what `studio-plug serve exp` loads" in err


def test_ls_key_with_weights_only_says_serve_needs_a_wrapper(checkpoints: Path) -> None:
    (checkpoints / "model.keras").unlink()
    code, out, err = cli("experiments", "ls", "exp")
    assert code == 0, err
    assert not any(line.startswith("*") for line in out.splitlines())
    assert "needs --wrapper FILE whose create_model(modeldir) builds the model" in err


def test_ls_key_for_an_empty_or_unknown_experiment(modeldir: Path) -> None:
    code, out, err = cli("experiments", "ls", "exp")
    assert code == 0 and out == "" and "serves the identity model" in err
    code, out, err = cli("experiments", "ls", "exq")
    assert code == 1 and out == ""
    assert err.splitlines()[0].endswith("did you mean 'exp'?"), err
    code, _, err = cli("experiments", "ls", "../exp")
    assert code == 1 and "invalid experiment key" in err


def test_ls_without_a_key_keeps_its_summary(checkpoints: Path) -> None:
    code, out, err = cli("experiments", "ls")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["KEY", "NEWEST", "CHECKPOINT"]
    # what serve loads: the Keras model, not the newer torch state_dict (no model in it)
    assert out.splitlines()[1].split()[:3] == ["exp", "model.keras", "keras"], out
    # files but none a loader recognises by name: not "identity", which serve would not use
    for name in ("model.keras", "weights.pt"):
        (checkpoints / name).unlink()
    empty = checkpoints.parent.parent / "empty" / "modeldir"
    empty.mkdir(parents=True)
    code, out, err = cli("experiments", "ls")
    assert code == 0, err
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["empty", "-", "identity", "-", "0"], ["exp", "-", "none", "-", "2"]]


def test_push_a_single_file_then_it_is_what_serve_loads(studio_home: Path, tmp_path: Path) -> None:
    inputs = keras.Input((3,))
    saved = tmp_path / "best.keras"
    keras.Model(inputs, keras.layers.Dense(1)(inputs)).save(saved)
    touch(saved, T0)
    code, out, err = cli("experiments", "push", "fresh", str(saved))
    assert code == 0 and "pushed 1 file(s) to fresh" in out, err
    copied = studio_home / "experiments" / "fresh" / "modeldir" / "best.keras"
    assert copied.read_bytes() == saved.read_bytes() and copied.stat().st_mtime == T0
    code, out, err = cli("experiments", "ls", "fresh")
    assert code == 0 and rows(out)["best.keras"][:2] == ["*", "keras"], (out, err)
    code, _, err = cli("experiments", "push", "fresh", str(tmp_path / "missing.keras"))
    assert code == 2 and "does not exist" in err


def test_pushing_an_older_checkpoint_says_which_one_serve_loads(studio_home: Path, tmp_path: Path) -> None:
    """push keeps modification times: an older file pushed after a newer one is not served, and
    push says so instead of leaving the user to find out from the answers."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    newer, older = tmp_path / "newer.keras", tmp_path / "best.keras"
    model.save(newer)
    model.save(older)
    touch(newer, T0 + 60)
    touch(older, T0)
    code, _, err = cli("experiments", "push", "kept", str(newer))
    assert code == 0 and "note:" not in err, err
    code, out, err = cli("experiments", "push", "kept", str(older))
    assert code == 0 and "pushed 1 file(s)" in out
    assert "serve kept` loads newer.keras" in err and "--checkpoint best.keras" in err, err


def test_pushing_a_model_beside_a_newer_state_dict_names_no_other_file(
        checkpoints: Path, tmp_path: Path) -> None:
    """A torch state_dict is no model, newer or not: push's note named it as what serve loads
    (by its name) when serve loaded the file just pushed (found trying the README)."""
    (checkpoints / "model.keras").unlink()
    inputs = keras.Input((3,))
    best = tmp_path / "best.keras"
    keras.Model(inputs, keras.layers.Dense(1)(inputs)).save(best)
    touch(best, T0)  # older than weights.pt
    code, out, err = cli("experiments", "push", "exp", str(best))
    assert code == 0 and "pushed 1 file(s)" in out, err
    assert "note:" not in err, err
    code, out, err = cli("experiments", "ls", "exp")
    assert code == 0 and rows(out)["best.keras"][:2] == ["*", "keras"], (out, err)
