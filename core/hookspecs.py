"""Every hook studio-plug calls. This module is the reference for plugin authors.

Most hooks have the *register-callback* shape: the host calls the hook with a ``register``
function and each plugin calls it once per thing it provides. The host validates what it is
given, keeps it under its name, and lets a plugin loaded later (third-party entry points come
after the built-ins) replace a built-in of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

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

PROJECT_NAME = "studio_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def studio_register_loaders(register: Callable[[Loader], None]) -> None:
    """Register checkpoint loaders: ``register(loader)`` with a ``studio_plugins.Loader``.

    A loader names the files it recognises in a modeldir (``patterns``) and turns one into a
    ``ServedModel``. Among every loader's matches the newest file is served.
    """


@hookspec
def studio_register_wrappers(register: Callable[[str, CreateModel], None]) -> None:
    """Register named wrappers: ``register(name, create_model)``.

    ``create_model(modeldir)`` returns a ``dict -> dict`` callable; ``--wrapper NAME`` uses it.
    """


@hookspec
def studio_register_stages(register: Callable[[str, Stage], None]) -> None:
    """Register named pipeline stages: ``register(name, func)``, usable as ``pipe.add(name)``."""


@hookspec
def studio_register_stores(register: Callable[[str, StoreFactory], None]) -> None:
    """Register experiment stores by URL scheme: ``register(scheme, factory)``.

    ``factory(url)`` returns a ``studio_plugins.ExperimentStore`` for ``--store URL``.
    """


@hookspec
def studio_register_backends(register: Callable[[Backend], None]) -> None:
    """Register where servers run: ``register(backend)``, chosen with ``--cloud NAME``."""


@hookspec
def studio_register_codecs(register: Callable[[Codec], None]) -> None:
    """Register wire formats: ``register(codec)``, chosen by media type or by sniffing the body."""


@hookspec
def studio_register_routes(register: Callable[[RouteFactory], None]) -> None:
    """Register HTTP routes: ``register(factory)``; ``factory(context)`` returns Starlette routes.

    ``context`` is the server's ``studio_plugins.ServingContext``: its models and the data plane
    (``await context.infer(name, payload)``), so a protocol added this way gets the queue,
    deadlines, batching, auth and metrics of ``POST /``. The Open Inference Protocol (V2) is one.
    """


@hookspec
def studio_register_listeners(register: Callable[[Listener], None]) -> None:
    """Register listeners: ``register(listener)``, a ``studio_plugins.Listener`` serving a
    protocol on a port of its own (gRPC), on the same data plane as HTTP.

    ``listener.reserve(options)`` runs in the launching process before the models load: it
    returns None when the options do not ask for it, else an ``OpenListener`` holding its
    port. In every serving process (each worker, after the fork) the server calls
    ``await open.start(context)`` before it announces itself, and ``await open.stop(grace)``
    when it stops accepting (SIGTERM, a shutdown request, ``--killafter``), so both protocols
    drain together.
    """


@hookspec
def studio_configure_threads(threads: int) -> None:
    """Set this process's intra-op thread count for your framework (``--workers``).

    Called with 1 in the parent before it loads models for worker processes — a framework that
    ran a multi-threaded op before ``fork`` hangs its children — and with
    ``--threads-per-worker`` in each worker right after the fork. Import nothing heavy that the
    process has not imported yet: set the framework's environment variables instead.
    """


@hookspec
def studio_watch_shutdown(options: ServeOptions, request_shutdown: Callable[[str, float], None]) -> None:
    """Watch for a reason to shut the server down, e.g. a cloud's notice that the machine goes.

    Called once in the serving process (with ``--workers``, the supervising parent), after the
    models are loaded and before it serves. Return at once: watch from your own daemon thread
    (a parent forks workers later: hold no lock they would need), and when the server must go
    call ``request_shutdown(reason, drain)`` (any thread, any time; the first call wins).
    Readiness turns false at once; after ``drain`` seconds (at most 600) the server stops
    accepting, finishes the requests in flight and exits 0, as on SIGTERM. Core knows no
    concrete cloud: deciding whether to watch (an option, the environment) is the plugin's.
    """


@hookspec
def studio_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``studio-plug`` command group (``@cli.command()``)."""
