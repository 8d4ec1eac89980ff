"""The embedded default store: a directory, Studio.ML's layout ``experiments/<key>/modeldir/``.

``file:///path`` (or a plain path) names its root; the default root is ``$STUDIOML_HOME``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from studio_plugins import (
    ExperimentError,
    ExperimentInfo,
    ExperimentStore,
    FileInfo,
    StoreError,
    StoreFactory,
    UnknownExperiment,
    hookimpl,
    validate_key,
)


def root_from_url(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StoreError(f"file store URL {url!r} names a remote host")
            return Path(unquote(parsed.path))
        return Path(url).expanduser()
    raise StoreError(f"not a file store URL: {url!r}")


def list_files(directory: Path) -> tuple[FileInfo, ...]:
    if not directory.is_dir():
        return ()
    files = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            stat = path.stat()
            mtime = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
            files.append(FileInfo(path.name, stat.st_size, mtime))
    return tuple(files)


def files_to_push(source: Path) -> list[tuple[Path, str]]:
    """(file, its path in the modeldir) for each file under the directory ``source``, or for
    the one file ``source``."""
    if source.is_file():
        return [(source, source.name)]
    if not source.is_dir():
        raise StoreError(f"{source} is neither a file nor a directory")
    return [(path, path.relative_to(source).as_posix())
            for path in sorted(source.rglob("*")) if path.is_file()]


class LocalStore(ExperimentStore):
    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url

    def _modeldir(self, key: str) -> Path:
        return self.root / "experiments" / validate_key(key) / "modeldir"

    def modeldir(self, key: str) -> Path:
        path = self._modeldir(key)
        if not path.is_dir():
            experiment = path.parent
            if experiment.is_dir():
                return path  # an experiment without a modeldir yet: identity, as the seed says
            if not self.root.is_dir():
                raise ExperimentError(
                    f"the store directory {self.root} does not exist",
                    hint="check --store / STUDIO_STORE / STUDIOML_HOME",
                )
            raise UnknownExperiment(
                f"no experiment {key!r} in {self.root}",
                hint=f"create it with `studio-plug experiments push {key} DIR` "
                "or get_model_directory() in your training script",
            )
        try:
            next(path.iterdir(), None)
        except OSError as exc:
            raise ExperimentError(f"cannot read modeldir {path}: {exc.strerror}") from None
        return path

    def fingerprint(self, key: str) -> str:
        """Names, sizes and mtimes (ns) of the modeldir's files: a stat per file, no reads."""
        directory = self._modeldir(key)
        if not directory.is_dir():
            return ""
        parts = []
        for path in sorted(directory.iterdir()):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return ";".join(parts)

    def experiments(self) -> list[ExperimentInfo]:
        base = self.root / "experiments"
        if not base.is_dir():
            return []
        return [
            ExperimentInfo(entry.name, list_files(entry / "modeldir"))
            for entry in sorted(base.iterdir())
            if entry.is_dir() and not entry.name.startswith(".")
        ]

    def push(self, key: str, source: Path) -> int:
        target = self._modeldir(key)
        target.mkdir(parents=True, exist_ok=True)
        count = 0
        for path, relative in files_to_push(source):
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)  # keeps mtimes: "newest" stays the newest
            count += 1
        return count


def open_local_store(url: str) -> ExperimentStore:
    root = root_from_url(url)
    return LocalStore(root, root.resolve().as_uri())


@hookimpl
def studio_register_stores(register: Callable[[str, StoreFactory], None]) -> None:
    register("file", open_local_store)
