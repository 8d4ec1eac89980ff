"""The plugin host: built-ins, throwaway plugins, overrides, disabling, validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import PluginError
from core.host import BUILTIN_PLUGINS, PluginHost
from core.http.codecs import CodecSet
from core.models.experiments import open_store
from studio_plugins import Codec, ExperimentStore, Payload, hookimpl
from studio_plugins.testing import make_host


class UpperCodec(Codec):
    name = "upper"
    media_types = ("text/x-upper",)

    def decode(self, body: bytes, limit: int) -> Payload:
        return {"text": body.decode().upper()}

    def encode(self, payload: Payload) -> bytes:
        return str(payload["text"]).encode()


class CodecPlugin:
    __name__ = "upper-codec"

    @hookimpl
    def studio_register_codecs(self, register: Callable[[Codec], None]) -> None:
        register(UpperCodec())


def test_builtins_are_registered_through_the_hooks() -> None:
    host = make_host()
    assert "identity" in host.loaders()
    assert {"pickle", "json", "npz"} <= set(host.codecs())
    assert "file" in host.stores()
    assert "local" in host.backends()
    names = {info.name for info in host.plugins()}
    assert {path.removeprefix("plugins.") for path in BUILTIN_PLUGINS} <= names


def test_a_throwaway_plugin_adds_a_codec() -> None:
    host = make_host(CodecPlugin())
    codecs = CodecSet(host.codecs())
    codec = codecs.for_request("text/x-upper", b"abc")
    assert codec.decode(b"abc", 1024) == {"text": "ABC"}
    info = {i.name: i for i in host.plugins()}["upper-codec"]
    assert info.registered == ["codec:upper"] and not info.builtin


def test_a_throwaway_plugin_adds_a_store(tmp_path: Path) -> None:
    opened: list[str] = []

    class MemoryStore(ExperimentStore):
        def __init__(self, url: str) -> None:
            self.url = url
            opened.append(url)

        def modeldir(self, key: str) -> Path:
            return tmp_path / key

        def experiments(self) -> list:  # type: ignore[type-arg]
            return []

        def push(self, key: str, source: Path) -> int:
            return 0

    class StorePlugin:
        @hookimpl
        def studio_register_stores(self, register: Callable[..., None]) -> None:
            register("mem", MemoryStore)

    store = open_store(make_host(StorePlugin()), "mem://bucket")
    assert isinstance(store, MemoryStore)
    assert store.modeldir("k") == tmp_path / "k"
    assert opened == ["mem://bucket"]


def test_a_later_plugin_replaces_a_builtin_of_the_same_name() -> None:
    class Replacement(UpperCodec):
        name = "json"
        media_types = ("application/json",)

    class Plugin:
        @hookimpl
        def studio_register_codecs(self, register: Callable[[Codec], None]) -> None:
            register(Replacement())

    assert isinstance(make_host(Plugin()).codecs()["json"], Replacement)


def test_a_misspelled_hookimpl_fails_check_pending() -> None:
    class Misspelled:
        @hookimpl
        def studio_register_codec(self, register: Callable[..., None]) -> None:  # no 's'
            pass

    with pytest.raises(PluginError, match="studio_register_codec"):
        make_host(Misspelled())


def test_a_hookimpl_with_unknown_arguments_is_refused() -> None:
    class WrongArgs:
        @hookimpl
        def studio_register_codecs(self, register: Callable[..., None], extra: int) -> None:
            pass

    with pytest.raises(PluginError, match="invalid"):
        make_host(WrongArgs())


def test_registering_the_wrong_type_is_a_plugin_error() -> None:
    class Wrong:
        @hookimpl
        def studio_register_loaders(self, register: Callable[..., None]) -> None:
            register("not a loader")

    with pytest.raises(PluginError, match="Loader"):
        make_host(Wrong()).loaders()


def test_disable_removes_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_PLUGINS_DISABLE", "codecs.json, codecs.npz")
    host = PluginHost(entry_points=False)
    assert set(host.codecs()) == {"pickle"}
    assert "codecs.json" not in {info.name for info in host.plugins()}



def test_the_ec2_package_keeps_its_plugin_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``plugins/backends/ec2/`` is a package now; its name for listings and
    STUDIO_PLUGINS_DISABLE is still ``backends.ec2``, and its hookimpl is still found."""
    assert "ec2" in PluginHost(entry_points=False).backends()
    assert "backends.ec2" in {info.name for info in PluginHost(entry_points=False).plugins()}
    monkeypatch.setenv("STUDIO_PLUGINS_DISABLE", "backends.ec2")
    assert set(PluginHost(entry_points=False).backends()) == {"local"}

def test_each_host_is_independent() -> None:
    with_plugin = make_host(CodecPlugin())
    without = make_host()
    assert "upper" in with_plugin.codecs()
    assert "upper" not in without.codecs()


def test_registries_are_collected_once() -> None:
    calls: list[int] = []

    class Counting:
        @hookimpl
        def studio_register_codecs(self, register: Callable[[Codec], None]) -> None:
            calls.append(1)
            register(UpperCodec())

    host = make_host(Counting())
    host.codecs()
    host.codecs()
    host.plugins()
    assert calls == [1]
