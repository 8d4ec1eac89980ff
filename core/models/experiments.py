"""Experiment keys, the embedded default store's location, and key -> store -> local modeldir."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from core.errors import ConfigurationError, ExperimentError, StudioError, UnknownExperiment
from core.host import PluginHost
from core.types import ExperimentStore

HOME_ENV = "STUDIOML_HOME"
STORE_ENV = "STUDIO_STORE"

# Keys become directory names (and S3 key segments): letters, digits, '.', '_', '-'; no leading
# dot, so '..' and hidden names cannot be formed, and no separators, so nothing escapes the store.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe experiment key, else raise ``ExperimentError``."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ExperimentError(
            f"invalid experiment key {key!r}",
            hint="keys use letters, digits, '.', '_' and '-' (at most 200), "
            "and do not start with '.' or contain '/'",
        )
    return key


def studio_home() -> Path:
    """``$STUDIOML_HOME``, default ``~/.studioml``: the embedded store and remote caches."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".studioml").expanduser()


def default_store_url() -> str:
    return os.environ.get(STORE_ENV) or studio_home().resolve().as_uri()


def find_modeldir(store: ExperimentStore, key: str) -> Path:
    """``store.modeldir(key)``; when the key is unknown, the error names the nearest key the store
    has (a typo is the usual cause)."""
    try:
        return store.modeldir(key)
    except UnknownExperiment as missing:
        try:
            keys = [info.key for info in store.experiments()]
        except StudioError:  # the listing failing too says nothing more
            raise missing from None
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        if not near:
            raise
        raise UnknownExperiment(f"{missing.message}; did you mean {near[0]!r}?", hint=missing.hint) from None


def open_store(host: PluginHost, url: str | None = None) -> ExperimentStore:
    """The store for ``url`` (default ``STUDIO_STORE`` or the embedded one), by its scheme."""
    url = url or default_store_url()
    scheme = urlparse(url).scheme or "file"
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = "file"
    factories = host.stores()
    if scheme not in factories:
        known = ", ".join(f"{name}://" for name in sorted(factories)) or "none"
        raise ConfigurationError(
            f"no experiment store for {url!r} (scheme {scheme!r})",
            hint=f"stores installed: {known}",
        )
    return factories[scheme](url)
