"""PluginHost: the one owner of the pluggy manager. Nothing else calls ``pm.hook``.

A host is built fresh per instance (never at import time): built-ins first, from the module
paths in ``BUILTIN_PLUGINS``, then the ``studio_plugins`` entry-point group, so a third party
registering a name a built-in already has replaces it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from core import hookspecs
from core.errors import PluginError
from core.types import (
    Backend,
    Codec,
    CreateModel,
    Listener,
    Loader,
    RouteFactory,
    ServeOptions,
    Stage,
    StoreFactory,
)

if TYPE_CHECKING:
    import click

log = logging.getLogger("studio_plugins.host")

ENTRY_POINT_GROUP = "studio_plugins"
DISABLE_ENV = "STUDIO_PLUGINS_DISABLE"
LOAD_ENV = "STUDIO_PLUGINS_LOAD"

# Built-ins are named by module path so that core imports none of them.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "plugins.loaders.identity",
    "plugins.loaders.keras",
    "plugins.loaders.torch",
    "plugins.commands.demo",
    "plugins.stores.local",
    "plugins.stores.s3",
    "plugins.backends.ec2",
    "plugins.commands.cloud",
    "plugins.backends.local",
    "plugins.codecs.pickle",
    "plugins.codecs.json",
    "plugins.codecs.npz",
    "plugins.stages.builtin",
    "plugins.protocols.v2",
    "plugins.protocols.grpc.listener",
)


def builtin_name(module_path: str) -> str:
    """``plugins.loaders.keras`` -> ``loaders.keras``: the name used in listings and env vars."""
    return module_path.removeprefix("plugins.")


@dataclass
class PluginInfo:
    """One registered plugin, for ``studio-plug plugins``."""

    name: str
    builtin: bool
    distribution: str | None = None
    version: str | None = None
    registered: list[str] = field(default_factory=list)
    """What it registered, as ``kind:name`` (``loader:keras``, ``codec:json``)."""


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


T = TypeVar("T")


class PluginHost:
    """A fresh plugin manager with the built-ins, entry points and typed registries."""

    def __init__(
        self,
        *,
        builtins: Sequence[str] = BUILTIN_PLUGINS,
        entry_points: bool = True,
        plugins: Iterable[object] = (),
        disable: Iterable[str] | None = None,
        load: Iterable[str] | None = None,
    ) -> None:
        """Build the manager.

        ``plugins``: extra plugin objects (modules or instances) registered last, for tests.
        ``disable``/``load`` default to ``STUDIO_PLUGINS_DISABLE``/``STUDIO_PLUGINS_LOAD``;
        ``load`` allow-lists third-party plugins only (built-ins stay unless disabled).
        """
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        disabled = set(disable) if disable is not None else _names_from_env(DISABLE_ENV)
        self._disabled: set[str] = disabled or set()
        self._allowed = set(load) if load is not None else _names_from_env(LOAD_ENV)
        self._info: dict[str, PluginInfo] = {}
        self._cache: dict[str, Any] = {}

        for module_path in builtins:
            name = builtin_name(module_path)
            if self._is_disabled(name, module_path):
                continue
            self._register(_import_plugin(module_path, name), PluginInfo(name, builtin=True))
        if entry_points:
            self._load_entry_points()
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            if not self._is_disabled(name):
                self._register(plugin, PluginInfo(name, builtin=False))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {exc.plugin!r} has a hook that studio-plug does not define: {exc}",
                hint="hooks are named studio_register_*; see docs/plugins.md",
            ) from None

    # --- registration ---------------------------------------------------------------------

    def _is_disabled(self, *names: str) -> bool:
        return any(name in self._disabled for name in names)

    def _register(self, plugin: object, info: PluginInfo) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {info.name!r} is invalid: {exc}") from None
        except ValueError as exc:  # already registered under this name
            raise PluginError(f"plugin {info.name!r} is registered twice: {exc}") from None
        self._info[info.name] = info

    def _load_entry_points(self) -> None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            name = entry_point.name
            if self._is_disabled(name) or (self._allowed is not None and name not in self._allowed):
                log.debug("plugin %s not loaded (disabled or not allow-listed)", name)
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} ({entry_point.value}) failed to import: {exc}",
                    hint=f"fix or uninstall it, or set {DISABLE_ENV}={name}",
                ) from exc
            dist = entry_point.dist
            self._register(
                plugin,
                PluginInfo(
                    name,
                    builtin=False,
                    distribution=dist.name if dist else None,
                    version=dist.version if dist else None,
                ),
            )

    def _collect(self, hook_name: str) -> list[tuple[str, tuple[Any, ...]]]:
        """Call ``hook_name`` on every plugin in registration order, attributing what each
        registers. Registration order (not pluggy's LIFO call order) lets later plugins win."""
        registered: list[tuple[str, tuple[Any, ...]]] = []
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():

            def register(*args: Any, _plugin: str = impl.plugin_name) -> None:
                registered.append((_plugin, args))

            available = {"register": register}  # pluggy lets an impl take a subset of arguments
            impl.function(*[available[arg] for arg in impl.argnames])
        return registered

    def _registry(
        self, hook_name: str, kind: str, key: Callable[[tuple[Any, ...]], str]
    ) -> dict[str, tuple[Any, ...]]:
        if hook_name in self._cache:
            return self._cache[hook_name]
        result: dict[str, tuple[Any, ...]] = {}
        for plugin_name, args in self._collect(hook_name):
            name = key(args)
            if name in result:
                log.debug("%s %r from %s replaces an earlier one", kind, name, plugin_name)
            result[name] = args
            self._info[plugin_name].registered.append(f"{kind}:{name}")
        self._cache[hook_name] = result
        return result

    def _typed(self, hook_name: str, kind: str, cls: type[T]) -> dict[str, T]:
        def name_of(args: tuple[Any, ...]) -> str:
            if len(args) != 1 or not isinstance(args[0], cls):
                raise PluginError(
                    f"{hook_name}: register() takes one {cls.__name__}, got {args!r}"
                )
            thing_name = getattr(args[0], "name", "")
            if not thing_name:
                raise PluginError(f"{hook_name}: {args[0]!r} has no name")
            return str(thing_name)

        return {name: args[0] for name, args in self._registry(hook_name, kind, name_of).items()}

    def _named(self, hook_name: str, kind: str) -> dict[str, Any]:
        def name_of(args: tuple[Any, ...]) -> str:
            if len(args) != 2 or not isinstance(args[0], str) or not callable(args[1]):
                raise PluginError(f"{hook_name}: register() takes (name, callable), got {args!r}")
            return args[0]

        return {name: args[1] for name, args in self._registry(hook_name, kind, name_of).items()}

    # --- typed registries -----------------------------------------------------------------

    def loaders(self) -> dict[str, Loader]:
        return self._typed("studio_register_loaders", "loader", Loader)

    def codecs(self) -> dict[str, Codec]:
        return self._typed("studio_register_codecs", "codec", Codec)

    def backends(self) -> dict[str, Backend]:
        return self._typed("studio_register_backends", "backend", Backend)

    def stores(self) -> dict[str, StoreFactory]:
        return self._named("studio_register_stores", "store")

    def wrappers(self) -> dict[str, CreateModel]:
        return self._named("studio_register_wrappers", "wrapper")

    def stages(self) -> dict[str, Stage]:
        return self._named("studio_register_stages", "stage")

    def route_factories(self) -> list[RouteFactory]:
        """Every registered route factory, in registration order."""
        def name_of(args: tuple[Any, ...]) -> str:
            if len(args) != 1 or not callable(args[0]):
                raise PluginError(f"studio_register_routes: register() takes one factory, got {args!r}")
            return f"{getattr(args[0], '__module__', '?')}.{getattr(args[0], '__qualname__', args[0])}"

        return [args[0] for args in self._registry("studio_register_routes", "routes", name_of).values()]

    def listeners(self) -> dict[str, Listener]:
        return self._typed("studio_register_listeners", "listener", Listener)

    def configure_threads(self, threads: int) -> None:
        self.pm.hook.studio_configure_threads(threads=threads)

    def watch_shutdown(self, options: ServeOptions, request: Callable[[str, float], None]) -> None:
        """Let every plugin start watching for a reason to shut the server down
        (``studio_watch_shutdown``). A plugin that fails here is logged, not fatal: the server
        serves on without its watch."""
        for impl in self.pm.hook.studio_watch_shutdown.get_hookimpls():
            try:
                impl.function(options=options, request_shutdown=request)
            except Exception:
                log.exception("plugin %s could not start watching for shutdown", impl.plugin_name)

    def add_commands(self, cli: click.Group) -> None:
        """Let every plugin add its subcommands, in registration order (a later one wins), and
        note which plugin added which (``command:NAME`` in ``plugins()``)."""
        for impl in self.pm.hook.studio_register_commands.get_hookimpls():
            before = set(cli.commands)
            impl.function(cli=cli)
            added = sorted(set(cli.commands) - before)
            self._info[impl.plugin_name].registered.extend(f"command:{name}" for name in added)

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with what it registered (all registries are collected)."""
        self.loaders(), self.codecs(), self.backends()
        self.stores(), self.wrappers(), self.stages(), self.route_factories(), self.listeners()
        return list(self._info.values())


def _import_plugin(module_path: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(module_path)
    except ImportError as exc:
        raise PluginError(
            f"built-in plugin {name!r} failed to import: {exc}",
            hint="reinstall studio-plugins",
        ) from exc
