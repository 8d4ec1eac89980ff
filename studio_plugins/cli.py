"""The ``studio-plug`` command line, built at call time from a fresh PluginHost."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from core.assembly import survey
from core.cors import check_origin
from core.errors import ConfigurationError, StudioError
from core.experiments import find_modeldir, open_store, validate_key
from core.host import PluginHost
from core.launch import launch, usable_cores
from core.types import ExperimentInfo, ExperimentStore, Loader, ModelSpec, ServeOptions
from core.version import __version__

F = TypeVar("F", bound=Callable[..., Any])

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*")
_UNITS = {None: 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20,
          "gb": 10**9, "gib": 2**30}


class ByteSize(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE.fullmatch(str(value))
        if not match:
            self.fail(f"{value!r} is not a size like 64MB or 1048576", param, ctx)
        number, unit = match.groups()
        return int(float(number) * _UNITS[unit.lower() if unit else None])


class WorkerCount(click.ParamType):
    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return usable_cores()
        try:
            count = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)
        if count < 1:
            self.fail("at least 1 worker", param, ctx)
        return count


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def report_errors(func: F) -> F:
    """Print a StudioError as one line (and its hint) and exit 1; tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StudioError as exc:
            if kwargs.get("debug") or os.environ.get("STUDIO_DEBUG"):
                raise
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _serve_command(host: PluginHost) -> click.Command:
    backends = host.backends()
    backend_params: list[click.Parameter] = []
    for backend in backends.values():
        backend_params.extend(backend.cli_options())
    backend_names = {param.name for param in backend_params}

    @click.command("serve", context_settings={"show_default": True})
    @click.argument("keys", nargs=-1, required=False, metavar="EXPERIMENT_KEY...")
    @click.option("--port", type=click.IntRange(0, 65535), default=5000,
                  help="TCP port to serve on; 0 picks a free one (the URL is printed).")
    @click.option("--host", "bind_host", default="localhost",
                  help="Address to listen on: localhost (this machine only) or 0.0.0.0 (every "
                  "interface).")
    @click.option("--killafter", type=click.FloatRange(min=0), default=3600,
                  help="Exit (status 0) after this many seconds with no request; never during a "
                  "request. 0 disables.")
    @click.option("--store", "store_url", envvar="STUDIO_STORE", show_envvar=True, default=None,
                  help="Experiment store URL (file:///path, ...); default: $STUDIOML_HOME "
                  "(~/.studioml).")
    @click.option("--cloud", type=click.Choice(sorted(backends)), default="local",
                  help="Where to run the server.")
    @click.option("--token", envvar="STUDIO_TOKEN", show_envvar=True, default=None,
                  help="Require 'Authorization: Bearer TOKEN' on every request but health checks "
                  "and the /docs page.")
    @click.option("--cors", multiple=True, metavar="ORIGIN",
                  help="Let web pages from ORIGIN (scheme://host[:port], as in their Origin header; "
                  "'*': any) call the server from a browser; repeatable. Default: no CORS headers.")
    @click.option("--wrapper", "wrapper_args", multiple=True,
                  help="A .py file, module or registered name with create_model(modeldir) "
                  "returning a dict -> dict callable. NAME=WRAPPER gives one model its own.")
    @click.option("--model", "model_args", multiple=True, metavar="NAME=KEY[:CHECKPOINT]",
                  help="Serve experiment KEY as model NAME (repeatable; after the positional "
                  "keys). POST /models/NAME and the V2 routes address it by name.")
    @click.option("--allow-partial", is_flag=True, default=False,
                  help="With several models: serve the others when one fails to load (it is "
                  "reported not ready) instead of failing the start.")
    @click.option("--watch", type=click.FloatRange(min=0), default=0,
                  help="Check the store every S seconds for a newer checkpoint and swap it in "
                  "without a restart (a load that fails keeps the old model). 0: off.")
    @click.option("--checkpoint", default=None, help="Serve this file of the modeldir instead of "
                  "the newest checkpoint.")
    @click.option("--loader", default=None, help="Force a loader (see `studio-plug plugins`).")
    @click.option("--trust-checkpoint", is_flag=True, default=False,
                  help="Allow checkpoints that run their own code when loaded (Keras Lambda "
                  "layers, pickled torch modules). Only for checkpoints you trust.")
    @click.option("--gpus", type=click.IntRange(min=0), default=0,
                  help="GPUs to use (local: CUDA when > 0 and present; cloud: instance size).")
    @click.option("--max-body", type=ByteSize(), default="64MiB",
                  help="Largest request body accepted; larger ones get 413.")
    @click.option("--read-timeout", type=click.FloatRange(min=0), default=20,
                  help="Seconds a request body may take to start arriving; after that it must "
                  "keep up --min-rate (as Apache's RequestReadTimeout body=20,MinRate=500), else "
                  "it is answered 408 and the connection closed. Request headers get 5 s, or "
                  "this when shorter. 0: no body read timeout.")
    @click.option("--min-rate", type=click.IntRange(min=0), default=500,
                  help="Bytes/s a request body must keep up: each N bytes received extend "
                  "--read-timeout by one second. 0: the whole body within --read-timeout.")
    @click.option("--body-budget", type=ByteSize(), default=None,
                  help="Bytes of request bodies held at once (per worker process); a body that "
                  "does not fit gets 503 with Retry-After before it is read. Default: 1GiB or 4 x "
                  "--max-body, whichever is more. 0: unbounded.")
    @click.option("--threads", type=click.IntRange(min=1), default=4,
                  help="Threads that run a synchronous model (the event loop never blocks).")
    @click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Seconds until a request is answered 504 (the late result is discarded). "
                  "Default: no deadline.")
    @click.option("--max-queue", type=click.IntRange(min=0), default=256,
                  help="Requests admitted at once (waiting or running); more get 503 with "
                  "Retry-After at once. 0: unbounded.")
    @click.option("--max-batch-size", type=click.IntRange(min=1), default=1,
                  help="Batch concurrent requests whose arrays agree in trailing shape and dtype "
                  "into one model call of up to N rows. 1: off. A wrapper opts out with "
                  "`model.batchable = False`.")
    @click.option("--max-batch-delay", type=click.FloatRange(min=0), default=5.0,
                  help="Milliseconds a request may wait for others to join its batch.")
    @click.option("--workers", type=WorkerCount(), default="1",
                  help="Worker processes: the model is loaded once, then N workers are forked and "
                  "share it (copy-on-write) and one socket. 'auto': one per usable core. Batching "
                  "forms batches within a worker.")
    @click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
                  help="Intra-op threads (torch/Keras) in each worker. Default: usable cores / "
                  "workers, at least 1.")
    @click.option("--metrics/--no-metrics", default=True,
                  help="Serve Prometheus metrics on GET /metrics.")
    @click.option("--access-log", is_flag=True, default=False,
                  help="Log one line per request: method, path, status, duration, batch size.")
    @click.option("--debug", is_flag=True, default=False,
                  help="Log debug output and return tracebacks in error replies.")
    @report_errors
    def serve(keys: tuple[str, ...], **params: Any) -> None:
        """Serve the newest checkpoint of EXPERIMENT_KEY over HTTP.

        Finds the experiment's modeldir in the store, loads its newest checkpoint with the
        loader that recognises it (the identity model for an empty modeldir; files no loader
        serves, such as weights alone, are an error), or builds the model with --wrapper, and
        serves it: POST / takes a pickled (or JSON, or npz) dict of named arrays
        and answers a dict of results. Several keys serve several models (POST /models/KEY).
        """
        setup_logging(params["debug"])
        for key in keys:
            validate_key(key)
        models = tuple(parse_model(arg) for arg in params.pop("model_args"))
        if not keys and not models:
            raise ConfigurationError(
                "nothing to serve", hint="name an experiment: studio-plug serve KEY"
            )
        names = [*keys, *(spec.name for spec in models)]
        wrapper, wrappers = parse_wrappers(params.pop("wrapper_args"), names)
        extra = {name: params.pop(name) for name in list(params) if name in backend_names}
        cloud = params.pop("cloud")
        params["cors"] = tuple(check_origin(origin) for origin in params["cors"])
        budget = params["body_budget"]
        if budget and budget < params["max_body"]:
            raise ConfigurationError(
                f"--body-budget {budget} is smaller than --max-body {params['max_body']}: a body "
                "of the largest size would never be read",
                hint="raise --body-budget, or leave it out (1GiB or 4 x --max-body)",
            )
        options = ServeOptions(
            keys=keys,
            models=models,
            wrapper=wrapper,
            wrappers=wrappers,
            store_url=params.pop("store_url"),
            host=params.pop("bind_host"),
            backend_options=extra,
            **params,
        )
        sys.exit(launch(host, options, cloud))

    serve.params.extend(backend_params)  # after the core options in --help
    return serve


def parse_model(arg: str) -> ModelSpec:
    """``NAME=KEY[:CHECKPOINT]`` -> ModelSpec."""
    name, sep, target = arg.partition("=")
    if not sep or not name or not target:
        raise ConfigurationError(f"--model {arg!r}: expected NAME=KEY[:CHECKPOINT]")
    key, _, checkpoint = target.partition(":")
    return ModelSpec(validate_key(name), validate_key(key), checkpoint or None)


def parse_wrappers(args: tuple[str, ...], names: list[str]) -> tuple[str | None, dict[str, str]]:
    """One wrapper for every model and/or ``NAME=WRAPPER`` for one."""
    common: str | None = None
    own: dict[str, str] = {}
    for arg in args:
        name, sep, target = arg.partition("=")
        if sep and name in names:
            own[name] = target
        elif common is None:
            common = arg
        else:
            raise ConfigurationError(
                f"--wrapper given twice ({common!r}, {arg!r})",
                hint="give one model its own wrapper with --wrapper NAME=PATH",
            )
    return common, own


def _experiments_group(host: PluginHost) -> click.Group:
    store_option = click.option("--store", "store_url", envvar="STUDIO_STORE", show_envvar=True,
                                default=None,
                                help="Experiment store URL; default: $STUDIOML_HOME.")

    @click.group("experiments")
    def experiments() -> None:
        """List experiments in a store and push checkpoints into it."""

    @experiments.command("ls")
    @click.argument("key", required=False)
    @store_option
    @report_errors
    def ls(key: str | None, store_url: str | None) -> None:
        """List experiments with their newest checkpoint and its time; with KEY, the files of
        that experiment's modeldir, the one `serve KEY` loads marked *."""
        store = open_store(host, store_url)
        if key is not None:
            list_checkpoints(store, validate_key(key))
            return
        loaders = host.loaders()
        infos = store.experiments()
        if not infos:
            click.echo(f"no experiments in {store.url}", err=True)
            return
        rows = [("KEY", "NEWEST CHECKPOINT", "LOADER", "MODIFIED (UTC)", "FILES")]
        for info in infos:
            newest = newest_by_name(info, loaders)
            if newest:
                mtime, name, loader_name = newest
                rows.append((info.key, name, loader_name,
                             mtime.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                             str(len(info.files))))
            else:
                # identity only when empty: files no loader serves make `serve` fail
                rows.append((info.key, "-", "none" if info.files else "identity", "-",
                             str(len(info.files))))
        echo_table(rows)

    def list_checkpoints(store: ExperimentStore, key: str) -> None:
        # the local modeldir (a remote store fetches it into its cache, as serve does), so that
        # loaders can look inside files: a state_dict is told from a model by its contents
        modeldir = find_modeldir(store, key)
        entries = survey(modeldir, host.loaders())
        if not entries:
            click.echo(f"experiment {key} has no files: `studio-plug serve {key}` serves the "
                       "identity model", err=True)
            return
        rows = [("", "FILE", "LOADER", "SIZE", "MODIFIED (UTC)", "")]
        for entry in entries:
            modified = datetime.fromtimestamp(entry.mtime, UTC).strftime("%Y-%m-%d %H:%M:%S")
            rows.append(("*" if entry.served else "", entry.path.name, entry.loader or "none",
                         "-" if entry.path.is_dir() else human_size(entry.size), modified,
                         entry.kind or ""))
        echo_table(rows)
        if any(entry.served for entry in entries):
            click.echo(f"* the newest checkpoint a loader recognises: what `studio-plug serve "
                       f"{key}` loads", err=True)
        else:
            click.echo(f"no file a loader can serve: `studio-plug serve {key}` needs --wrapper "
                       "FILE whose create_model(modeldir) builds the model", err=True)

    @experiments.command("push")
    @click.argument("key")
    @click.argument("source", metavar="DIRECTORY|FILE",
                    type=click.Path(exists=True, path_type=Path))
    @store_option
    @report_errors
    def push(key: str, source: Path, store_url: str | None) -> None:
        """Copy the files of DIRECTORY, or one FILE, into experiment KEY's modeldir."""
        validate_key(key)
        store = open_store(host, store_url)
        count = store.push(key, source)
        click.echo(f"pushed {count} file(s) to {key} in {store.url}")
        # push keeps modification times, so an older checkpoint pushed now is not the one served
        info = next((info for info in store.experiments() if info.key == key), None)
        newest = newest_by_name(info, host.loaders()) if info else None
        if newest and source.is_file() and newest[1] != source.name:
            click.echo(f"note: `studio-plug serve {key}` loads {newest[1]}, the newest checkpoint "
                       f"(by modification time), not {source.name}; `serve --checkpoint "
                       f"{source.name}` picks it", err=True)

    return experiments


def newest_by_name(info: ExperimentInfo, loaders: dict[str, Loader]) -> tuple[datetime, str, str] | None:
    """(mtime, name, loader) of the newest file a loader recognises by its name, or None: what
    a store's listing tells without fetching files."""
    recognised = [(f.mtime, f.name, loader.name) for f in info.files for loader in loaders.values()
                  if loader.patterns and loader.recognises(Path(f.name))]
    return max(recognised) if recognised else None


def echo_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def human_size(size: int) -> str:
    """Decimal units, as the store's progress bars count (1.5 MB = 1,500,000 bytes)."""
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("KB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _plugins_command(host: PluginHost) -> click.Command:
    @click.command("plugins")
    @click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
    @report_errors
    def plugins(show_all: bool) -> None:
        """List installed plugins and what each registered."""
        infos = [info for info in host.plugins() if show_all or not info.builtin]
        if not infos:
            click.echo("no third-party plugins installed (--all lists the built-ins)")
            return
        for info in infos:
            origin = "built-in" if info.builtin else (
                f"{info.distribution} {info.version}" if info.distribution else "local"
            )
            click.echo(f"{info.name} ({origin})")
            for item in info.registered:
                click.echo(f"  {item}")

    return plugins


def build_cli(host: PluginHost) -> click.Group:
    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="studio-plug")
    def cli() -> None:
        """Serve trained models from their experiments' checkpoints.

        \b
        studio-plug serve KEY              serve experiment KEY on http://127.0.0.1:5000/
        studio-plug experiments ls [KEY]   list experiments, or one experiment's files
        studio-plug plugins --all          list loaders, stores, codecs, backends
        """

    cli.add_command(_serve_command(host))
    cli.add_command(_experiments_group(host))
    cli.add_command(_plugins_command(host))
    host.add_commands(cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    try:
        host = PluginHost()
    except StudioError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(1)
    build_cli(host)(args=argv, prog_name="studio-plug")


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["build_cli", "main"]
