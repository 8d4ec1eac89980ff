"""The backend's ``serve`` options, each declared once: a dataclass field whose metadata is
its flag.

The field gives the flag's name (``key_name`` is ``--key-name``), its default and, for a
``bool``, that it takes no value; ``flag(...)`` adds the help and, where one is needed, the
click type. ``Flags.cli_options`` builds the click options from that and ``Flags.from_options``
reads the values back from ``ServeOptions.backend_options``, so the two cannot drift apart
(core declares ``ServeOptions``' own options the same way, in core/options.py, which plugins do
not import).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self

from studio_plugins import ServeOptions

if TYPE_CHECKING:
    import click

FLAG = "studio_ec2_flag"
"""The dataclass field metadata key that holds a field's ``Flag``."""


@dataclass(frozen=True)
class Flag:
    help: str
    click_type: Callable[[ModuleType], Any] | None = None
    """Makes the click type from the click module, which is imported only to build the CLI."""
    envvar: str | None = None


def flag(default: Any, help: str, *, click_type: Callable[[ModuleType], Any] | None = None,
         envvar: str | None = None) -> Any:
    """A field of a ``Flags`` class, declared with its command-line form."""
    return dataclasses.field(default=default, metadata={FLAG: Flag(help, click_type, envvar)})


@dataclass(frozen=True)
class Flags:
    """Base of a frozen dataclass whose fields are all declared with ``flag``."""

    @classmethod
    def from_options(cls, options: ServeOptions) -> Self:
        """The values given on the command line; the fields' defaults for the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.backend_options.items() if k in names and v is not None})

    @classmethod
    def cli_options(cls) -> list[click.Option]:
        import click

        options = []
        for f in dataclasses.fields(cls):
            spec: Flag = f.metadata[FLAG]
            settings: dict[str, Any] = {"default": f.default, "help": spec.help}
            if isinstance(f.default, bool):
                settings["is_flag"] = True
            if spec.click_type is not None:
                settings["type"] = spec.click_type(click)
            if spec.envvar is not None:
                settings["envvar"] = spec.envvar
            options.append(click.Option([f"--{f.name.replace('_', '-')}"], **settings))
        return options
