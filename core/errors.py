"""One error hierarchy. Each error knows the HTTP status it maps to and a hint for the user.

Assembly errors (raised before the port is bound) are printed by the CLI as one line plus the
hint; request errors become a JSON body ``{"error": ..., "type": ...}`` with ``status``.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base class: a message for the user, an HTTP status and an optional hint."""

    status: int = 500
    type_name: str = "StudioError"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__


# --- assembly / configuration (the CLI prints these before binding a port) -------------------


class ConfigurationError(StudioError):
    """Options that cannot work together or a value that makes no sense."""

    status = 400


class PluginError(StudioError):
    """A plugin is broken: a misspelled hook, a registration of the wrong type, a name clash."""


class ExperimentError(StudioError):
    """The experiment key is invalid, or its modeldir cannot be read."""

    status = 404


class UnknownExperiment(ExperimentError):
    """The store has no experiment of that key (stores raise it; the caller may suggest a
    near one)."""


class StoreError(StudioError):
    """The experiment store cannot be reached or refused us."""

    status = 502


class LoadError(StudioError):
    """A checkpoint or wrapper could not be turned into a model."""


class MissingDependencyError(LoadError):
    """An optional framework is not installed; the hint names the extra that provides it."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"{module} is not installed",
            hint=f"pip install 'studio-plugins[{extra}]'",
        )
        self.module = module
        self.extra = extra


class BackendError(StudioError):
    """A backend could not start or manage a server."""


# --- request errors (mapped to HTTP responses) ------------------------------------------------


class BadRequest(StudioError):
    status = 400


class Unauthorized(StudioError):
    status = 401


class NotFound(StudioError):
    status = 404


class MethodNotAllowed(StudioError):
    status = 405

    def __init__(self, message: str, *, allow: str = "POST", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.allow = allow
        """The methods the route takes: a 405 reply must say them (``Allow``, RFC 9110)."""


class Conflict(StudioError):
    """The request cannot be carried out in the server's current configuration."""

    status = 409


class RequestTimeout(StudioError):
    """The body did not arrive in time (``--read-timeout``, ``--min-rate``)."""

    status = 408


class PayloadTooLarge(StudioError):
    status = 413


class UnsupportedMediaType(StudioError):
    status = 415


class ModelError(StudioError):
    """The model raised, or returned something that is not a dict."""

    status = 500


class Overloaded(StudioError):
    status = 503


class NotReady(StudioError):
    status = 503


class DeadlineExceeded(StudioError):
    status = 504
