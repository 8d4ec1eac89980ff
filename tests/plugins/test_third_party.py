"""A third-party plugin, installed the way pip installs one (a module plus a ``dist-info`` with an
entry point in the ``studio_plugins`` group), is picked up with no configuration: listed by
`studio-plug plugins`, used by `serve`, and switched off by STUDIO_PLUGINS_DISABLE.

The plugin is the complete example of docs/plugins.md, taken from that page, so the example
there is known to work.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.host import BUILTIN_PLUGINS, PluginHost
from studio_plugins import LoadOptions
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
MODULE = "studio_acme"


def example_plugin_source() -> str:
    blocks = re.findall(r"```python\n(# studio_acme\.py\n.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/plugins.md has one complete example, `# studio_acme.py`"
    return blocks[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that, on sys.path or PYTHONPATH, holds the installed distribution studio-acme."""
    site = tmp_path_factory.mktemp("site-packages")
    (site / f"{MODULE}.py").write_text(example_plugin_source())
    dist_info = site / "studio_acme-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: studio-acme\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text(f"[studio_plugins]\nacme = {MODULE}\n")
    return site


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch):
    """studio-acme importable (and its entry point visible) in this process, for one test."""
    for variable in ("STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(MODULE, None)


def test_entry_point_is_loaded_after_the_builtins(installed: Path) -> None:
    host = PluginHost(builtins=BUILTIN_PLUGINS, disable=(), load=None)
    assert "acme" in host.loaders() and "acme-plus-one" in host.wrappers()
    info = {plugin.name: plugin for plugin in host.plugins()}["acme"]
    assert (info.builtin, info.distribution, info.version) == (False, "studio-acme", "1.2.3")
    assert info.registered == ["loader:acme", "wrapper:acme-plus-one"]
    assert list(host.loaders())[-1] == "acme"  # after the built-ins: it could replace one


def test_the_loader_works_in_process(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "model.acme").write_text("3")
    host = PluginHost(builtins=BUILTIN_PLUGINS, disable=(), load=None)
    model = host.loaders()["acme"].load(tmp_path / "model.acme", LoadOptions())
    np.testing.assert_array_equal(model.predict({"x": np.ones(2)})["x"], [3.0, 3.0])


def test_disable_and_allow_lists(installed: Path) -> None:
    assert "acme" not in PluginHost(builtins=BUILTIN_PLUGINS, disable=["acme"]).loaders()
    assert "acme" not in PluginHost(builtins=BUILTIN_PLUGINS, disable=(), load=["other"]).loaders()
    assert "acme" in PluginHost(builtins=BUILTIN_PLUGINS, disable=(), load=["acme"]).loaders()


def cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(site), **env}
    for variable in ("STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
        if variable not in env:
            environment.pop(variable, None)
    return subprocess.run([sys.executable, "-m", "studio_plugins", *args], capture_output=True,
                          text=True, env=environment, timeout=120)


@pytest.mark.timeout(150)
def test_plugins_command_lists_it_with_distribution_and_what_it_registered(site: Path) -> None:
    listed = cli(site, "plugins")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "acme (studio-acme 1.2.3)", "  loader:acme", "  wrapper:acme-plus-one",
    ]
    everything = cli(site, "plugins", "--all").stdout
    assert "loaders.keras (built-in)\n  loader:keras\n" in everything
    assert "commands.demo (built-in)\n  command:demo\n" in everything
    assert everything.rstrip().endswith("acme (studio-acme 1.2.3)\n  loader:acme\n  wrapper:acme-plus-one")
    disabled = cli(site, "plugins", STUDIO_PLUGINS_DISABLE="acme")
    assert "acme" not in disabled.stdout and "no third-party plugins" in disabled.stdout


@pytest.fixture
def acme_experiment(studio_home: Path, modeldir: Path) -> Path:
    (modeldir / "model.acme").write_text("3")
    return modeldir


@pytest.mark.timeout(150)
def test_serve_uses_the_third_party_loader_for_its_file_type(site: Path, acme_experiment: Path) -> None:
    with ServerProcess("exp", env={"PYTHONPATH": str(site)}) as server:
        reply = predict(server.url, {"x": np.arange(3.0)})
        np.testing.assert_array_equal(reply["x"], [0.0, 3.0, 6.0])
    assert any("model.acme with loader acme" in line for line in server.stderr_lines), server.output()


@pytest.mark.timeout(150)
def test_serve_without_it_names_the_file_no_loader_serves(site: Path, acme_experiment: Path) -> None:
    # not the identity model: echoing every request with a 200 would hide the missing plugin
    refused = cli(site, "serve", "exp", "--port", "0", STUDIO_PLUGINS_DISABLE="acme")
    assert refused.returncode == 1 and refused.stdout == "", refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.acme (unrecognised)" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
