"""``--store s3://bucket/prefix``: experiments in S3 (or any S3-compatible endpoint), cached locally.

Experiment ``KEY``'s modeldir is either an archive ``prefix/experiments/KEY/modeldir.tar`` (also
``.tar.gz``, ``.tgz``: Studio.ML's remote layout) or loose files under
``prefix/experiments/KEY/modeldir/``; when both exist, the more recently uploaded one is served.
It is fetched into ``$STUDIOML_HOME/cache/s3/...`` and fetched again only when an ETag changed:
asking costs one LIST request, an unchanged remote no download at all.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from plugins.aws import aws_errors, client
from plugins.progress import Progress
from plugins.stores.local import files_to_push
from plugins.stores.s3_cache import ModeldirCache, RemoteState
from plugins.stores.safe_tar import extract_archive
from studio_plugins import (
    ExperimentError,
    ExperimentInfo,
    ExperimentStore,
    FileInfo,
    StoreError,
    StoreFactory,
    UnknownExperiment,
    hookimpl,
    studio_home,
    validate_key,
)

ARCHIVE_NAMES = ("modeldir.tar", "modeldir.tar.gz", "modeldir.tgz")
MTIME_METADATA = "mtime"
"""User metadata ``push`` stores with each file: its local mtime, restored on download, so the
newest checkpoint stays the newest."""
_CHUNK = 1024 * 1024
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Without leading or trailing slashes; empty for the bucket's root."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)


def parse_s3_url(url: str) -> S3Location:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an S3 store URL: {url!r}", hint="write it as s3://BUCKET/PREFIX")
    if not _BUCKET.fullmatch(parsed.netloc):
        raise StoreError(f"{parsed.netloc!r} is not a valid S3 bucket name ({url})")
    segments = [s for s in parsed.path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        # the prefix also names a folder of the local cache: it must not climb out of it
        raise StoreError(f"the S3 prefix in {url!r} contains '.' or '..' segments")
    return S3Location(parsed.netloc, "/".join(segments))


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


@dataclass(frozen=True)
class RemoteObject:
    key: str
    etag: str
    size: int
    modified: datetime


@dataclass
class RemoteExperiment:
    """The objects of one experiment, split by layout."""

    files: dict[str, RemoteObject]
    archives: dict[str, RemoteObject]
    others: int = 0

    def state(self) -> tuple[RemoteState, RemoteObject | None]:
        """Which layout is served (the most recently uploaded), and its archive if any."""
        newest_files = max((o.modified for o in self.files.values()), default=None)
        archive = max(self.archives.items(), key=lambda item: item[1].modified, default=None)
        if archive and (newest_files is None or archive[1].modified > newest_files):
            name, obj = archive
            return RemoteState(f"archive:{name}", {name: obj.etag}), obj
        if self.files:
            return RemoteState("files", {n: o.etag for n, o in self.files.items()}), None
        return RemoteState("empty"), None


class S3Store(ExperimentStore):
    def __init__(self, location: S3Location) -> None:
        self.location = location
        self.url = location.url
        self._client: Any = None

    # --- plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client("s3")
        return self._client

    def errors(self, what: str | None = None) -> Any:
        bucket = self.location.bucket
        return aws_errors(StoreError, what or self.url, missing={
            "NoSuchBucket": (f"S3 bucket {bucket!r} does not exist ({self.url})",
                             f"create it (`aws s3 mb s3://{bucket}`) or fix --store"),
        })

    def _objects(self, prefix: str) -> Iterator[RemoteObject]:
        with self.errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    yield RemoteObject(
                        item["Key"], item["ETag"], int(item["Size"]), item["LastModified"]
                    )

    def _experiments_prefix(self) -> str:
        return self.location.key("experiments") + "/"

    def _group(self, objects: Iterator[RemoteObject]) -> dict[str, RemoteExperiment]:
        base = self._experiments_prefix()
        found: dict[str, RemoteExperiment] = {}
        for obj in objects:
            key, _, rest = obj.key[len(base):].partition("/")
            try:
                validate_key(key)
            except ExperimentError:
                continue  # not something this store wrote or can serve
            experiment = found.setdefault(key, RemoteExperiment({}, {}))
            if rest.startswith("modeldir/"):
                name = rest.removeprefix("modeldir/")
                if name.endswith("/") or not name:
                    continue  # a "folder" marker
                if _safe_relative(name):
                    experiment.files[name] = obj
            elif rest in ARCHIVE_NAMES:
                experiment.archives[rest] = obj
            else:
                experiment.others += 1
        return found

    def _experiment(self, key: str) -> RemoteExperiment | None:
        validate_key(key)
        return self._group(self._objects(self._experiments_prefix() + key + "/")).get(key)

    def cache(self, key: str) -> ModeldirCache:
        loc = self.location
        root = studio_home() / "cache" / "s3" / loc.bucket
        root = root.joinpath(*loc.prefix.split("/")) if loc.prefix else root
        return ModeldirCache(root / "experiments" / validate_key(key))

    def _missing(self, key: str) -> ExperimentError:
        return UnknownExperiment(
            f"no experiment {key!r} in {self.url}",
            hint=f"push it with `studio-plug experiments push {key} DIR --store {self.url}`",
        )

    # --- the store API --------------------------------------------------------------------

    def modeldir(self, key: str) -> Path:
        experiment = self._experiment(key)
        if experiment is None:
            raise self._missing(key)
        state, archive = experiment.state()
        cache = self.cache(key)
        with cache.lock():
            if cache.is_current(state):
                return cache.modeldir
            previous = cache.manifest()
            if archive is not None:
                return cache.replace(state, lambda new, _old: self._fetch_archive(archive, new))

            def build(new: Path, old: Path | None) -> None:
                reusable = previous.etags if previous and previous.source == "files" else {}
                for name, obj in sorted(experiment.files.items()):
                    target = new / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if old is not None and reusable.get(name) == obj.etag and (old / name).is_file():
                        _link_or_copy(old / name, target)
                    else:
                        self._download(obj, target)

            return cache.replace(state, build)

    def experiments(self) -> list[ExperimentInfo]:
        found = self._group(self._objects(self._experiments_prefix()))
        infos = []
        for key, experiment in sorted(found.items()):
            state, archive = experiment.state()
            if archive is not None:
                cache = self.cache(key)
                if cache.is_current(state):  # list the archive's files when we have them
                    files = _local_files(cache.modeldir)
                else:
                    name = state.source.removeprefix("archive:")
                    files = (FileInfo(name, archive.size, archive.modified),)
            else:
                files = tuple(
                    FileInfo(name, obj.size, obj.modified)
                    for name, obj in sorted(experiment.files.items())
                )
            infos.append(ExperimentInfo(key, files))
        return infos

    def push(self, key: str, source: Path) -> int:
        validate_key(key)
        files = files_to_push(source)
        # oldest first: upload times (what listings show) then order files as their mtimes do
        files.sort(key=lambda file: (file[0].stat().st_mtime, file[1]))
        for path, relative in files:
            self.upload(path, self.location.key("experiments", key, "modeldir", relative))
        return len(files)

    def exists(self, key: str) -> bool:
        return self._experiment(key) is not None

    def fingerprint(self, key: str) -> str:
        experiment = self._experiment(key)
        return experiment.state()[0].token() if experiment else ""

    # --- transfers (the EC2 backend uploads wrappers with these too) -------------------------

    def upload(self, path: Path, object_key: str) -> None:
        stat = path.stat()
        progress = Progress(f"uploading {path.name}", stat.st_size)
        with self.errors(f"s3://{self.location.bucket}/{object_key}"):
            self.client.upload_file(
                str(path), self.location.bucket, object_key,
                ExtraArgs={"Metadata": {MTIME_METADATA: repr(stat.st_mtime)}},
                Callback=progress,
            )
        progress.close()

    def delete(self, object_key: str) -> None:
        with self.errors(f"s3://{self.location.bucket}/{object_key}"):
            self.client.delete_object(Bucket=self.location.bucket, Key=object_key)

    def _download(self, obj: RemoteObject, target: Path) -> None:
        label = f"s3://{self.location.bucket}/{obj.key}"
        with self.errors(label):
            response = self.client.get_object(Bucket=self.location.bucket, Key=obj.key)
            progress = Progress(f"downloading {Path(obj.key).name}", obj.size)
            with open(target, "wb") as handle:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    handle.write(chunk)
                    progress(len(chunk))
            progress.close()
        mtime = _metadata_mtime(response.get("Metadata") or {})
        if mtime is None:
            mtime = response.get("LastModified", obj.modified).timestamp()
        os.utime(target, (mtime, mtime))

    def _fetch_archive(self, obj: RemoteObject, target: Path) -> None:
        handle, name = tempfile.mkstemp(prefix=".archive-", dir=target.parent)
        os.close(handle)
        archive = Path(name)
        try:
            self._download(obj, archive)
            extract_archive(archive, target, f"s3://{self.location.bucket}/{obj.key}")
        finally:
            archive.unlink(missing_ok=True)


def _metadata_mtime(metadata: dict[str, str]) -> float | None:
    try:
        return float(metadata[MTIME_METADATA])
    except (KeyError, ValueError):
        return None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the old folder is deleted right after: share the bytes
    except OSError:
        shutil.copy2(source, target)


def _local_files(directory: Path) -> tuple[FileInfo, ...]:
    files = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            mtime = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
            files.append(FileInfo(path.relative_to(directory).as_posix(), stat.st_size, mtime))
    return tuple(files)


def open_s3_store(url: str) -> ExperimentStore:
    return S3Store(parse_s3_url(url))


@hookimpl
def studio_register_stores(register: Callable[[str, StoreFactory], None]) -> None:
    register("s3", open_s3_store)
