"""``--wrapper``: a .py file, a module name or a registered name, served end to end; clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from core.errors import LoadError
from core.models.wrappers import load_wrapper, resolve_wrapper
from studio_plugins import CreateModel, hookimpl
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess, make_host

# The seed's increment wrapper, brought to Python 3 (no six).
INCREMENT = '''
def create_model(modeldir):
    def model(data):
        retval = {}
        for k, v in data.items():
            retval[k] = v + 1
        return retval

    return model
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_seed_increment_wrapper_from_a_file_on_the_given_port(modeldir: Path, tmp_path: Path) -> None:
    wrapper = write(tmp_path / "wrappers" / "model_increment.py", INCREMENT)
    port = free_port()
    with ServerProcess("exp", "--wrapper", str(wrapper), "--port", str(port)) as server:
        assert server.url == f"http://127.0.0.1:{port}/"  # --port is honoured with --wrapper
        result = predict(server.url, {"a": np.array([1, 2])})
        assert result["a"].tolist() == [2, 3]
        request = urllib.request.Request(server.url, data=b'{"a": [1, 2]}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"a": [2, 3]}
    assert any("wrapper" in line for line in server.stderr_lines)


@pytest.mark.timeout(120)
def test_a_wrapper_given_as_a_module_name(modeldir: Path, tmp_path: Path) -> None:
    write(tmp_path / "mods" / "increment_wrapper_mod.py", INCREMENT)
    path = os.pathsep.join(filter(None, [str(tmp_path / "mods"), os.environ.get("PYTHONPATH")]))
    with ServerProcess("exp", "--wrapper", "increment_wrapper_mod", env={"PYTHONPATH": path}) as server:
        assert predict(server.url, {"x": np.array([[1.5]])})["x"].tolist() == [[2.5]]


BROKEN = {
    "missing file": (None, "does not exist"),
    "no create_model": ("def make_model(modeldir):\n    return dict\n", "has no create_model function"),
    "create_model raises": (
        "def create_model(modeldir):\n    raise RuntimeError('no checkpoint in ' + modeldir)\n",
        "create_model raised RuntimeError: no checkpoint in",
    ),
    "import fails": ("import no_such_module_here\n", "failed to import"),
    "returns no callable": ("def create_model(modeldir):\n    return 42\n", "not a callable"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_wrapper_is_one_clear_error_before_the_port_is_bound(
    modeldir: Path, tmp_path: Path, case: str
) -> None:
    source, message = BROKEN[case]
    wrapper = tmp_path / "broken_wrapper.py"
    if source is not None:
        write(wrapper, source)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "studio_plugins", "serve", "exp", "--wrapper", str(wrapper),
         "--port", str(port), "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # never served
    with socket.socket() as after:  # and the port was not left taken
        after.bind(("127.0.0.1", port))


# --- resolution, in process ----------------------------------------------------------------------


def test_a_registered_wrapper_by_name(modeldir: Path) -> None:
    def create_model(path: str) -> Callable[[dict[str, object]], dict[str, object]]:
        return lambda data: {"modeldir": path, **data}

    class Wrappers:
        @hookimpl
        def studio_register_wrappers(self, register: Callable[[str, CreateModel], None]) -> None:
            register("echo-modeldir", create_model)

    served = load_wrapper(make_host(Wrappers()), "echo-modeldir", modeldir)
    assert served.platform == "wrapper"
    assert served.predict({"a": 1}) == {"modeldir": str(modeldir), "a": 1}


def test_a_wrapper_file_is_loaded_by_path_without_touching_sys_path(tmp_path: Path) -> None:
    write(tmp_path / "pkg" / "helper_next_to_it.py", "VALUE = 1\n")
    wrapper = write(tmp_path / "pkg" / "my-wrapper.py", '''
        def create_model(modeldir):
            try:
                import helper_next_to_it  # noqa: F401
                found = True
            except ImportError:
                found = False
            return lambda data: {"sibling_importable": found}
    ''')
    before = list(sys.path)
    create_model = resolve_wrapper(make_host(), str(wrapper))
    assert sys.path == before
    assert create_model(str(tmp_path))({}) == {"sibling_importable": False}
    assert create_model.__module__.startswith("studio_wrapper_my_wrapper_")


def test_two_files_with_the_same_name_are_two_modules(tmp_path: Path) -> None:
    source = "def create_model(m):\n    return lambda d: {'which': %r}\n"
    first = write(tmp_path / "a" / "wrapper.py", source % "a")
    second = write(tmp_path / "b" / "wrapper.py", source % "b")
    host = make_host()
    one, two = resolve_wrapper(host, str(first)), resolve_wrapper(host, str(second))
    assert one.__module__ != two.__module__
    assert one("")({}) == {"which": "a"} and two("")({}) == {"which": "b"}


def test_an_unknown_module_name_lists_the_registered_wrappers() -> None:
    with pytest.raises(LoadError, match="neither a file, an importable module nor a registered") as info:
        resolve_wrapper(make_host(), "no_such_wrapper_module")
    assert info.value.hint is not None and "registered wrappers" in info.value.hint


def test_a_directory_is_not_a_wrapper(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="is a directory"):
        resolve_wrapper(make_host(), str(tmp_path) + "/")


def test_a_modelpipe_wrapper_is_served_request_by_request(modeldir: Path, tmp_path: Path) -> None:
    wrapper = write(tmp_path / "pipe_wrapper.py", '''
        from studio_plugins.model_util import ModelPipe

        def create_model(modeldir):
            return ModelPipe().add(lambda x: x * 2, num_workers=2)
    ''')
    served = load_wrapper(make_host(), str(wrapper), modeldir)
    assert served.batchable is False  # each key is an item: requests must not be stacked together
    assert served.predict({"a": 1, "b": 2}) == {"a": 2, "b": 4}


FAILING_PIPE = """
from studio_plugins.model_util import ModelPipe


def stage(value):
    if isinstance(value, str) and value == "raise":
        raise ValueError("asked to fail")
    return None if isinstance(value, str) and value == "none" else value


def create_model(modeldir):
    return ModelPipe().add(stage, num_workers=2)
"""


@pytest.mark.timeout(120)
def test_the_client_tells_a_failed_pipe_item_from_a_none_the_model_answered(
    modeldir: Path, tmp_path: Path,
) -> None:
    wrapper = write(tmp_path / "failing_pipe.py", FAILING_PIPE)
    hostile = "a, b\r\nX-Injected: 1 日本"
    many = {f"bad-{index:04d}": "raise" for index in range(500)}  # 4.5 KB of keys: cut short
    with ServerProcess("exp", "--wrapper", str(wrapper)) as server:
        result = predict(server.url, {"ok": np.arange(3), hostile: "raise", "quiet": "none"})
        assert result[hostile] is None and result["quiet"] is None and result["ok"].tolist() == [0, 1, 2]
        assert result.failed == (hostile,) and result.failed_count == 1
        assert predict(server.url, {"quiet": "none"}).failed == ()
        cut = predict(server.url, {"ok": 1, **many})
        assert cut.failed_count == 500 and 0 < len(cut.failed) < 500
        assert cut.failed == tuple(many)[: len(cut.failed)]
        assert "asked to fail" in server.output()  # each failure is logged with its key


KERAS_AT_THE_TOP = """
import keras


def create_model(modeldir):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones")(inputs))
    backend = keras.backend.backend()
    return lambda data: {"y": model.predict(data["x"], verbose=0), "backend": backend}
"""


@pytest.mark.timeout(120)
def test_a_wrapper_importing_keras_runs_without_keras_backend_set(modeldir: Path, tmp_path: Path) -> None:
    # Keras 3 defaults to TensorFlow, which is not installed: the server sets the torch backend
    # before it imports a wrapper (issue 14)
    wrapper = write(tmp_path / "keras_wrapper.py", KERAS_AT_THE_TOP)
    server = ServerProcess("exp", "--wrapper", str(wrapper))
    server.env.pop("KERAS_BACKEND", None)
    with server:
        reply = predict(server.url, {"x": np.ones((2, 3), "f4")})
        assert reply["y"].tolist() == [[3.0], [3.0]] and reply["backend"] == "torch"


@pytest.mark.parametrize(
    ("source", "hint"),
    [("import tensorflow\n", "KERAS_BACKEND"),
     ("import no_such_module_here\n", "imports no_such_module_here")],
)
def test_a_wrapper_whose_import_is_missing_says_what_to_do(tmp_path: Path, source: str, hint: str) -> None:
    wrapper = write(tmp_path / "missing.py", source + "def create_model(modeldir):\n    return dict\n")
    with pytest.raises(LoadError) as refused:
        resolve_wrapper(make_host(), str(wrapper))
    assert refused.value.hint is not None and hint in refused.value.hint


def test_a_wrapper_is_batched_only_when_it_says_so(modeldir: Path, tmp_path: Path) -> None:
    # batching is on by default: a wrapper's rows may depend on each other unless it says not
    plain = write(tmp_path / "plain_wrapper.py", '''
        def create_model(modeldir):
            return lambda data: {"y": data["x"] - data["x"].mean(axis=0)}
    ''')
    declared = write(tmp_path / "declared_wrapper.py", '''
        def create_model(modeldir):
            def model(data):
                return {"y": data["x"] * 2}
            model.batchable = True
            return model
    ''')
    assert load_wrapper(make_host(), str(plain), modeldir).batchable is False
    assert load_wrapper(make_host(), str(declared), modeldir).batchable is True
