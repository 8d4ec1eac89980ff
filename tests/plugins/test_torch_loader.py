"""The torch loader with real TorchScript and torch.export checkpoints written here; files that
are not servable on their own (state_dict, pickled module); `studio-plug serve` end to end."""

from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from studio_plugins import BadRequest, LoadError, LoadOptions, MissingDependencyError
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess, make_host

torch = pytest.importorskip("torch")


class Affine(torch.nn.Module):
    """x @ W.T + b, then doubled: a model with real weights and a known answer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


class Pair(torch.nn.Module):
    """Two named inputs, two outputs."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


def expected(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def save_script(model: torch.nn.Module, path: Path, trace: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.trace(model, torch.ones(1, 3)) if trace else torch.jit.script(model)
        torch.jit.save(scripted, str(path))
    return path


def save_exported(model: torch.nn.Module, path: Path, *examples: torch.Tensor) -> Path:
    batch = torch.export.Dim("batch")
    names = ["x"] if len(examples) == 1 else ["a", "b"]
    program = torch.export.export(model, examples, dynamic_shapes={n: {0: batch} for n in names})
    torch.export.save(program, str(path))
    return path


def torch_loader():
    return make_host().loaders()["torch"]


X = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


@pytest.mark.parametrize(("name", "trace"), [("model.pt", False), ("model.pth", True)])
def test_torchscript_answers_like_the_module(tmp_path: Path, name: str, trace: bool) -> None:
    module = Affine().eval()
    path = save_script(module, tmp_path / name, trace=trace)
    model = torch_loader().load(path, LoadOptions())
    assert model.platform == "torch" and [s.name for s in model.inputs] == ["x"]
    # the seed's contract: under the key sent, even the input's own name; V2's call names outputs
    np.testing.assert_allclose(model.predict({"x": X})["x"], expected(module, X), rtol=1e-5)
    np.testing.assert_allclose(model.predict_named({"x": X})["output_0"], expected(module, X), rtol=1e-5)
    # per key, and a JSON-style float64 batch is cast to the weights' float32
    reply = model.predict({"a": X, "b": X[:1].astype(np.float64)})
    np.testing.assert_allclose(reply["a"], expected(module, X), rtol=1e-5)
    np.testing.assert_allclose(reply["b"], expected(module, X[:1]), rtol=1e-5)
    assert reply["b"].dtype == np.float32


def test_torchscript_signature_traced_is_known_and_primed_scripted_is_unknown(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    module = Affine().eval()
    with caplog.at_level(logging.INFO, logger="studio_plugins.loaders"):
        traced = torch_loader().load(save_script(module, tmp_path / "t.pt", trace=True), LoadOptions())
    # traced with a (1, 3) float32 example: that dtype and shape, any batch; the priming call
    # says what it answers
    assert [(s.name, s.datatype, s.shape) for s in traced.inputs] == [("x", "FP32", (-1, 3))]
    assert [(s.name, s.datatype, s.shape) for s in traced.outputs] == [("output_0", "FP32", (-1, 2))]
    assert "not primed" not in caplog.text
    # an example, not a limit: integers are cast to its float32, and any batch size goes
    reply = traced.predict({"k": np.arange(12).reshape(4, 3)})
    np.testing.assert_allclose(reply["k"], expected(module, np.arange(12, dtype=np.float32).reshape(4, 3)),
                               rtol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="studio_plugins.loaders"):
        scripted = torch_loader().load(save_script(Pair(), tmp_path / "s.pt"), LoadOptions())
    # scripted: names from the schema, nothing else: not primed, dtypes and shapes unknown
    assert [(s.name, s.datatype) for s in scripted.inputs] == [("a", "UNKNOWN"), ("b", "UNKNOWN")]
    assert [(s.name, s.datatype) for s in scripted.outputs] == [("output_0", "UNKNOWN"),
                                                                ("output_1", "UNKNOWN")]
    assert "not primed" in caplog.text


def test_exported_program_with_dynamic_batch(tmp_path: Path) -> None:
    module = Affine(seed=3).eval()
    path = save_exported(module, tmp_path / "model.pt2", torch.ones(2, 3))
    model = torch_loader().load(path, LoadOptions())
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("x", "FP32", (-1, 3))]
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("output_0", "FP32", (-1, 2))]
    for size in (1, 7):
        batch = X[:1].repeat(size, axis=0)
        np.testing.assert_allclose(model.predict({"k": batch})["k"], expected(module, batch), rtol=1e-5)


def test_an_exported_program_with_a_fixed_batch_says_how_to_export_it(tmp_path: Path) -> None:
    program = torch.export.export(Affine(seed=3).eval(), (torch.ones(4, 3),))  # no dynamic_shapes
    torch.export.save(program, str(tmp_path / "fixed.pt2"))
    model = torch_loader().load(tmp_path / "fixed.pt2", LoadOptions())
    fixed = r"takes exactly \(4, 3\): it was saved with a fixed batch size of 4"
    with pytest.raises(BadRequest, match=fixed) as refused:
        model.predict({"k": X[:2]})
    assert "N: any size" not in refused.value.message and "dynamic_shapes" in (refused.value.hint or "")
    assert model.predict({"k": X[:1].repeat(4, axis=0)})["k"].shape == (4, 2)  # its own batch works


def test_exported_program_with_two_named_inputs(tmp_path: Path) -> None:
    path = save_exported(Pair(), tmp_path / "pair.pt2", torch.ones(2, 3), torch.ones(2, 3))
    model = torch_loader().load(path, LoadOptions())
    a, b = X, X + 1
    reply = model.predict({"a": a, "b": b})
    np.testing.assert_allclose(reply["output_0"], a + b, rtol=1e-6)
    np.testing.assert_allclose(reply["output_1"], a * b, rtol=1e-6)


def test_concurrent_calls(tmp_path: Path) -> None:
    module = Affine().eval()
    model = torch_loader().load(save_script(module, tmp_path / "m.pt"), LoadOptions())
    batches = [np.random.default_rng(i).normal(size=(1 + i % 4, 3)).astype(np.float32) for i in range(48)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda batch: model.predict({"k": batch})["k"], batches))
    for batch, answer in zip(batches, answers, strict=True):
        np.testing.assert_allclose(answer, expected(module, batch), rtol=1e-5)


def test_a_state_dict_needs_its_class(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(Affine().state_dict(), path)
    with pytest.raises(LoadError, match="state_dict") as error:
        torch_loader().load(path, LoadOptions(trust_checkpoint=True))
    assert "--wrapper" in (error.value.hint or "")


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: torch.save's default; 4+: STACK_GLOBAL
def test_weights_are_told_from_a_model_without_unpickling(tmp_path: Path, protocol: int) -> None:
    def saved(name: str, content: object) -> Path:
        torch.save(content, tmp_path / name, pickle_protocol=protocol)
        return tmp_path / name

    module = Affine()
    optimizer = torch.optim.Adam(module.parameters())
    weights = [
        saved("state.pt", module.state_dict()),
        saved("training.pth", {"epoch": 3, "model": module.state_dict(), "step": torch.tensor(7),
                               "optimizer": optimizer.state_dict(), "dtype": torch.float16,
                               "size": torch.Size([2]), "device": torch.device("cpu"),
                               "loss": np.float64(0.25), "history": np.ones(3)}),
        saved("parameter.pt", torch.nn.Parameter(torch.ones(2))),
    ]
    for path in weights:
        assert not torch_loader().recognises(path), path.name
        assert torch_loader().describe(path) == "a torch state_dict: weights without the model's class"
    # a pickled module names its class: still recognised (and refused at load unless trusted)
    whole = saved("whole.pt", module)
    assert torch_loader().recognises(whole) and torch_loader().describe(whole) is None
    script = save_script(Affine(), tmp_path / "script.pt")
    assert torch_loader().recognises(script) and torch_loader().describe(script) is None


def test_deciding_runs_nothing_from_the_file(tmp_path: Path) -> None:
    # a pickle that would run code: told apart by reading its opcodes, never executing them
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"weight": torch.ones(2), "boom": Boom()}, tmp_path / "evil.pt")
    from plugins.loaders.torch_pickle import saved_tensors_only

    assert saved_tensors_only(tmp_path / "evil.pt") is False
    assert torch_loader().recognises(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
    # not a zip, or cut short: undecided, so the load decides (and says what is wrong)
    (tmp_path / "text.pt").write_text("hello")
    truncated = tmp_path / "cut.pt"
    torch.save(Affine().state_dict(), tmp_path / "whole-state.pt")
    truncated.write_bytes((tmp_path / "whole-state.pt").read_bytes()[:200])
    for path in (tmp_path / "text.pt", truncated):
        assert saved_tensors_only(path) is None and torch_loader().recognises(path)


def test_a_pickled_module_is_refused_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "whole.pth"
    module = Affine().eval()
    torch.save(module, path)  # pickles a reference to this test module's Affine class
    with pytest.raises(LoadError, match="pickled Python object") as error:
        torch_loader().load(path, LoadOptions())
    assert "--wrapper" in (error.value.hint or "") and "--trust-checkpoint" in (error.value.hint or "")
    model = torch_loader().load(path, LoadOptions(trust_checkpoint=True))
    np.testing.assert_allclose(model.predict({"x": X})["x"], expected(module, X), rtol=1e-5)


def test_loads_inside_the_loader_cannot_unpickle_code(tmp_path: Path) -> None:
    """torch.export.load calls torch.load(weights_only=False) on pickled parts of an archive;
    the loader's guard turns every such call into a weights-only one unless trusted."""
    from plugins.loaders.torch_runtime import weights_only_loads

    path = tmp_path / "whole.pt"
    torch.save(Affine(), path)
    with weights_only_loads(trusted=False), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    with weights_only_loads(trusted=True):
        assert isinstance(torch.load(path, weights_only=False), Affine)


def test_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    for name in ("half.pt", "half.pt2"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 truncated")
        with pytest.raises(LoadError, match=re.escape(name) + " is not a"):
            torch_loader().load(tmp_path / name, LoadOptions())


def test_a_text_file_named_like_a_checkpoint_is_not_called_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_text("not a model at all\n")
    with pytest.raises(LoadError, match=r"model\.pt is not a TorchScript, torch.export or torch.save file") \
            as error:
        torch_loader().load(tmp_path / "model.pt", LoadOptions())
    assert "pickled" not in error.value.message


def test_gpus_without_cuda_fall_back_to_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    module = Affine().eval()
    with caplog.at_level(logging.WARNING):
        model = torch_loader().load(save_script(module, tmp_path / "m.pt"), LoadOptions(gpus=1))
    assert "no CUDA device" in caplog.text
    np.testing.assert_allclose(model.predict({"x": X})["x"], expected(module, X), rtol=1e-5)


def test_missing_torch_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError) as missing:
        torch_loader().load(tmp_path / "m.pt", LoadOptions())
    assert missing.value.hint == "pip install 'studio-plugins[torch]'"


@pytest.mark.timeout(150)
def test_missing_torch_on_the_command_line_is_one_line(studio_home: Path, modeldir: Path) -> None:
    save_script(Affine(), modeldir / "m.pt")
    program = ("import sys; sys.modules['torch'] = None\n"
               "from studio_plugins.cli import main\nmain(['serve', 'exp', '--port', '0'])")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**os.environ, "STUDIOML_HOME": str(studio_home)}, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert lines == ["error: torch is not installed", "hint: pip install 'studio-plugins[torch]'"]


@pytest.mark.timeout(150)
def test_torchscript_and_exported_served_end_to_end(tmp_path: Path) -> None:
    """One server, two experiments: `scripted` (TorchScript) and `exported` (torch.export)."""
    home = tmp_path / "studioml"
    scripted, exported = Affine(seed=1).eval(), Affine(seed=2).eval()
    for key, writer in (
        ("scripted", lambda d: save_script(scripted, d / "model.pt")),
        ("exported", lambda d: save_exported(exported, d / "model.pt2", torch.ones(2, 3))),
    ):
        directory = home / "experiments" / key / "modeldir"
        directory.mkdir(parents=True)
        writer(directory)
    env = {"STUDIOML_HOME": str(home), "STUDIO_STORE": ""}
    with ServerProcess("scripted", "exported", env=env) as server:
        batch = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
        reply = predict(server.url, {"x": batch})  # POST / : the first key
        np.testing.assert_allclose(reply["x"], expected(scripted, batch), rtol=1e-5)
        reply = predict(server.url + "models/exported", {"x": batch})
        np.testing.assert_allclose(reply["x"], expected(exported, batch), rtol=1e-5)
        reply = predict(server.url + "models/exported", {"one": batch[:1], "all": batch})
        np.testing.assert_allclose(reply["one"], expected(exported, batch[:1]), rtol=1e-5)
        np.testing.assert_allclose(reply["all"], expected(exported, batch), rtol=1e-5)


@pytest.mark.timeout(150)
def test_a_loaded_model_runs_in_a_forked_child_with_several_threads(tmp_path: Path) -> None:
    from tests.plugins.forking import forked_child

    path = save_exported(Affine(), tmp_path / "m.pt2", torch.ones(2, 3))
    assert forked_child("torch", path, (64, 3)) == "child finished"


def test_exported_programs_load_in_parallel_threads(tmp_path: Path) -> None:
    """Several models load in parallel threads at start-up; torch.export.load keeps a global
    deserializer and failed with "_CURRENT_DESERIALIZER is already set" when two overlapped."""
    modules = [Affine(seed=seed).eval() for seed in range(4)]
    paths = [save_exported(module, tmp_path / f"m{i}.pt2", torch.ones(2, 3))
             for i, module in enumerate(modules)]
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda path: torch_loader().load(path, LoadOptions()), paths))
    for module, model in zip(modules, models, strict=True):
        np.testing.assert_allclose(model.predict({"k": X})["k"], expected(module, X), rtol=1e-5)
