"""Each ``serve`` option declared once, as metadata on its ``ServeOptions`` field.

The field gives the name, type and default; ``option(...)`` adds the flag, the kind of value and
the help. From that one declaration the CLI builds the click options of ``serve``
(studio_plugins/cli.py) and ``serve_argv`` writes the command line that serves the same options
on an instance or a worker, so a new option cannot be forgotten in one of them (the round-trip
test, tests/core/test_serve_options.py, parses every field back). A backend that serves
different options elsewhere changes them with ``dataclasses.replace``, never by editing argv.

The kernel stays free of click: a ``Kind`` names the value's shape and bounds, and the CLI maps it
to a click type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.types import ServeOptions

OPTION = "studio_option"
"""The dataclass field metadata key that holds a field's ``Option``."""


@dataclass(frozen=True)
class Kind:
    """The shape of an option's value: ``text``, ``int``, ``float``, ``size`` (bytes, ``64MiB``),
    ``workers`` (``N`` or ``auto``), ``flag`` (present or not) or ``switch`` (``--x/--no-x``);
    ``low``/``high`` bound numbers (``low_open``: ``low`` itself is refused)."""

    name: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False


TEXT = Kind("text")
FLAG = Kind("flag")
SWITCH = Kind("switch")
SIZE = Kind("size")
WORKERS = Kind("workers")


def integer(low: int | None = None, high: int | None = None) -> Kind:
    return Kind("int", low, high)


def number(low: float | None = None, *, low_open: bool = False) -> Kind:
    return Kind("float", low, None, low_open)


@dataclass(frozen=True)
class Option:
    """How one ``ServeOptions`` field is given on the command line."""

    flag: str | None
    """``--port``; None: the positional arguments."""
    help: str
    kind: Kind = TEXT
    metavar: str | None = None
    envvar: str | None = None
    secret: bool = False
    """Travels in the environment (``envvar``), never on a command line: process listings."""
    always: bool = False
    """On the command line even at its default: an instance may install a version whose default
    differs, and these decide its port, address, lifetime and limits."""
    shown_default: str | None = None
    """The default as ``--help`` shows it, when the value's own form reads worse (64MiB)."""
    item: Callable[[Any], str] | None = None
    """Writes one item of a repeated option (a ``ModelSpec`` as ``NAME=KEY[:CHECKPOINT]``)."""
    parsed_by: str | None = None
    """The field whose click option also gives this one (``--wrapper NAME=PATH`` -> ``wrappers``):
    no click option of its own."""

    @property
    def multiple(self) -> bool:
        return self.item is not None


def option(default: Any, flag: str | None, help: str, *, factory: Callable[[], Any] | None = None,
           **details: Any) -> Any:
    """A ``ServeOptions`` field declared with its command-line form (see ``Option``)."""
    metadata = {OPTION: Option(flag, help, **details)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def declared(options_type: type) -> list[tuple[dataclasses.Field[Any], Option]]:
    """The fields of ``options_type`` with an ``Option``, in declaration (and ``--help``) order."""
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(options_type) if OPTION in f.metadata]


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def write(kind: Kind, value: Any) -> str:
    """One value as the command line gives it; read back by the CLI to the same value."""
    if kind.name == "float":
        short = f"{value:g}"  # 3600, not 3600.0; repr when :g would round
        return short if float(short) == value else repr(float(value))
    return str(value)


def serve_argv(options: ServeOptions) -> list[str]:
    """The ``studio-plug serve ...`` command line that serves ``options``.

    Options at their default are left out (except ``always`` ones), secrets too (see
    ``serve_environment``), and ``backend_options``: the backend that sends the command has
    read them, and what it sends serves where it lands."""
    argv = ["studio-plug", "serve"]
    for f, spec in declared(type(options)):
        value = getattr(options, f.name)
        if spec.secret or (value == default_of(f) and not spec.always):
            continue
        if spec.flag is None:
            argv[2:2] = list(value)
        elif spec.kind is FLAG:
            argv.append(spec.flag)
        elif spec.kind is SWITCH:
            argv.append(spec.flag if value else f"--no-{spec.flag[2:]}")
        elif spec.item is not None:
            items = value.items() if isinstance(value, Mapping) else value
            for item in items:
                argv += [spec.flag, spec.item(item)]
        else:
            argv += [spec.flag, write(spec.kind, value)]
    return argv


def serve_environment(options: ServeOptions) -> dict[str, str]:
    """The environment that carries ``options``' secrets (the token) beside ``serve_argv``."""
    return {
        spec.envvar: str(getattr(options, f.name))
        for f, spec in declared(type(options))
        if spec.secret and spec.envvar and getattr(options, f.name) is not None
    }
