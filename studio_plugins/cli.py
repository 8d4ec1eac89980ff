"""The ``studio-plug`` command line, built at call time from a fresh PluginHost."""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from core.errors import ConfigurationError, StudioError
from core.host import PluginHost
from core.http.cors import check_origin
from core.models.assembly import survey
from core.models.experiments import find_modeldir, open_store, validate_key
from core.options import FLAG, SWITCH, Kind, declared, default_of, write
from core.process.launch import launch, usable_cores
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


def _click_type(kind: Kind) -> Any:
    """The click type of an option's ``Kind`` (core/options.py)."""
    if kind.name == "int":
        return click.IntRange(None if kind.low is None else int(kind.low),
                              None if kind.high is None else int(kind.high))
    if kind.name == "float":
        return click.FloatRange(kind.low, kind.high, min_open=kind.low_open)
    return {"size": ByteSize(), "workers": WorkerCount()}.get(kind.name)


def serve_params() -> list[click.Parameter]:
    """The click parameters of ``serve``, one per ``ServeOptions`` field's declaration."""
    fields = declared(ServeOptions)
    shared = {spec.parsed_by for _, spec in fields if spec.parsed_by}
    params: list[click.Parameter] = []
    for f, spec in fields:
        if spec.parsed_by:
            continue  # given by another field's option (--wrapper NAME=PATH)
        if spec.flag is None:
            params.append(click.Argument([f.name], nargs=-1, required=False, metavar=spec.metavar))
            continue
        settings: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar}
        if spec.envvar:
            settings.update(envvar=spec.envvar, show_envvar=True)
        decls = [spec.flag, f.name]
        if spec.multiple or f.name in shared:
            settings["multiple"] = True  # a shared one gets every value, the CLI sorts them
        else:
            settings["default"] = default_of(f)
        if spec.kind is FLAG:
            settings["is_flag"] = True
        elif spec.kind is SWITCH:
            decls[0] = f"{spec.flag}/--no-{spec.flag[2:]}"
        else:
            settings["type"] = _click_type(spec.kind)
        # the default as --help shows it (64MiB; 3600, not 3600.0): click converts it as typed
        if spec.shown_default is not None:
            settings["default"] = spec.shown_default
        elif spec.kind.name == "float" and isinstance(f.default, float):
            settings["default"] = write(spec.kind, f.default)
        params.append(click.Option(decls, **settings))
    return params


def serve_options(params: dict[str, Any], backend_names: set[str]) -> ServeOptions:
    """``ServeOptions`` from what click parsed (``serve_params`` and the backends' options),
    with the checks click cannot make; ``params`` is consumed."""
    keys = tuple(validate_key(key) for key in params.pop("keys"))
    models = tuple(parse_model(arg) for arg in params.pop("models"))
    if not keys and not models:
        raise ConfigurationError(
            "nothing to serve", hint="name an experiment: studio-plug serve KEY"
        )
    names = [*keys, *(spec.name for spec in models)]
    params["wrapper"], params["wrappers"] = parse_wrappers(params.pop("wrapper"), names)
    extra = {name: params.pop(name) for name in list(params) if name in backend_names}
    params["cors"] = tuple(check_origin(origin) for origin in params["cors"])
    budget = params["body_budget"]
    if budget and budget < params["max_body"]:
        raise ConfigurationError(
            f"--body-budget {budget} is smaller than --max-body {params['max_body']}: a body "
            "of the largest size would never be read",
            hint="raise --body-budget, or leave it out (1GiB or 4 x --max-body)",
        )
    return ServeOptions(keys=keys, models=models, backend_options=extra, **params)


def parse_serve_argv(host: PluginHost, argv: Sequence[str]) -> ServeOptions:
    """What ``studio-plug serve ...`` (``argv``, as ``serve_argv`` writes it) would serve,
    without serving: ``parse_serve_argv(host, serve_argv(options)) == options``. Secrets come
    from the environment, as on the instance (``serve_environment``)."""
    if list(argv[:2]) != ["studio-plug", "serve"]:
        raise ConfigurationError(f"not a serve command line: {shlex.join(argv)}")
    command = _serve_command(host)
    backend_names = {str(param.name) for backend in host.backends().values()
                     for param in backend.cli_options()}
    with command.make_context("serve", list(argv[2:])) as ctx:
        # the backends' options only where given: the command line serves where it runs
        params = {name: value for name, value in ctx.params.items() if name not in backend_names
                  or ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    params.pop("cloud")
    return serve_options(params, backend_names)


def _serve_command(host: PluginHost) -> click.Command:
    backends = host.backends()
    backend_params: list[click.Parameter] = []
    for backend in backends.values():
        backend_params.extend(backend.cli_options())
    backend_names = {str(param.name) for param in backend_params}

    @click.command("serve", context_settings={"show_default": True})
    @report_errors
    def serve(**params: Any) -> None:
        """Serve the newest checkpoint of EXPERIMENT_KEY over HTTP.

        Finds the experiment's modeldir in the store, loads its newest checkpoint with the
        loader that recognises it (the identity model for an empty modeldir; files no loader
        serves, such as weights alone, are an error), or builds the model with --wrapper, and
        serves it: POST / takes a pickled (or JSON, or npz) dict of named arrays
        and answers a dict of results. Several keys serve several models (POST /models/KEY).
        """
        setup_logging(params["debug"])
        cloud = params.pop("cloud")
        sys.exit(launch(host, serve_options(params, backend_names), cloud))

    params = serve_params()
    # --cloud is this command's alone: the command line it sends serves where it lands
    after_store = next(i for i, p in enumerate(params) if p.name == "store_url") + 1
    params.insert(after_store, click.Option(
        ["--cloud"], type=click.Choice(sorted(backends)), default="local",
        help="Where to run the server."))
    serve.params.extend(params)
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
            newest = served_checkpoint(store, info, loaders)
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
        newest = served_checkpoint(store, info, host.loaders()) if info else None
        if newest and source.is_file() and newest[1] != source.name:
            click.echo(f"note: `studio-plug serve {key}` loads {newest[1]}, the newest checkpoint "
                       f"(by modification time), not {source.name}; `serve --checkpoint "
                       f"{source.name}` picks it", err=True)

    return experiments


def served_checkpoint(store: ExperimentStore, info: ExperimentInfo, loaders: dict[str, Loader]
                      ) -> tuple[datetime, str, str] | None:
    """(mtime, name, loader) of the file ``serve KEY`` loads, or None. A local store's files are
    looked into as ``serve`` looks (a torch state_dict is no model: ``survey``); a remote
    store's listing tells only names (fetching every modeldir to look would cost downloads), so
    there it is ``newest_by_name``."""
    if not store.url.startswith("file:"):
        return newest_by_name(info, loaders)
    for entry in survey(store.modeldir(info.key), loaders):
        if entry.served and entry.loader:
            return datetime.fromtimestamp(entry.mtime, UTC), entry.path.name, entry.loader
    return None


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
