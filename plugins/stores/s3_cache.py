"""The local cache of one remote modeldir: the files, a manifest of their ETags, and a lock.

``$STUDIOML_HOME/cache/s3/<bucket>/<prefix>/experiments/<key>/`` holds ``modeldir/`` and
``manifest.json``. The manifest records what the remote looked like when ``modeldir/`` was
fetched, so an unchanged remote is never downloaded again and a changed one always is. A refresh
builds a new folder beside the old one and swaps it in; the manifest is removed before the swap
and written after it, so a crash in between means "stale", never "current with old files".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RemoteState:
    """What a modeldir looks like remotely: its source and each object's ETag."""

    source: str
    """``files`` (loose objects under ``modeldir/``), ``archive:NAME`` or ``empty``."""
    etags: dict[str, str] = field(default_factory=dict)
    """Path relative to the modeldir (or the archive's name) -> ETag."""

    def token(self) -> str:
        return self.source + ";" + ";".join(f"{n}={e}" for n, e in sorted(self.etags.items()))


class ModeldirCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.modeldir = root / "modeldir"
        self.manifest_path = root / "manifest.json"

    def manifest(self) -> RemoteState | None:
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return None
        return RemoteState(str(data.get("source")), dict(data.get("etags") or {}))

    def is_current(self, state: RemoteState) -> bool:
        return self.modeldir.is_dir() and self.manifest() == state

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One refresh at a time per cached modeldir, across processes (POSIX ``flock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
            yield
            return
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def replace(self, state: RemoteState, build: Callable[[Path, Path | None], None]) -> Path:
        """``build(new_dir, old_dir)`` fills a fresh folder (reusing unchanged files from
        ``old_dir`` if it likes); it then becomes ``modeldir/`` and ``state`` the manifest."""
        self.root.mkdir(parents=True, exist_ok=True)
        new = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        try:
            build(new, self.modeldir if self.modeldir.is_dir() else None)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        self.manifest_path.unlink(missing_ok=True)
        old = None
        if self.modeldir.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=self.root))
            os.replace(self.modeldir, old / "modeldir")
        os.replace(new, self.modeldir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        payload = {"version": MANIFEST_VERSION, "source": state.source, "etags": state.etags}
        temporary = self.manifest_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(payload, indent=1, sort_keys=True))
        os.replace(temporary, self.manifest_path)
        return self.modeldir
