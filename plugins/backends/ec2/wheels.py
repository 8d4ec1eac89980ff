"""Ship what runs here: wheels of the running ``studio-plugins`` and of the installed plugin
distributions that are on no index, uploaded to the store for the instance to install.

``studio-plugins`` is not on PyPI, and a plugin installed from a local folder is on no index
either, so the instance cannot ``pip install`` them by name. Instead each is made a wheel here:

- running from a source tree (a checkout, an editable install): ``pip wheel --no-deps
  --no-build-isolation`` on a copy of that tree (git's tracked and untracked-not-ignored files,
  so a stale ``build/`` or the user's scratch files never end up inside, and nothing is written
  into the tree);
- installed from a wheel (or a non-editable folder install): the wheel is rebuilt from the
  installed files its ``RECORD`` lists, so it holds exactly the code that runs here.

A plugin distribution installed from an index is named ``name==version`` instead. Each wheel is
uploaded under ``PREFIX/wheels/SHA256/FILENAME``: the same bytes land at the same key (builds
are reproducible: ``SOURCE_DATE_EPOCH``, fixed zip times), so a relaunch uploads nothing new,
and a launch that fails deletes only the wheels it uploaded itself.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import studio_plugins
from plugins.aws import error_code
from studio_plugins import BackendError, ConfigurationError

DISTRIBUTION = "studio-plugins"
ENTRY_POINT_GROUP = "studio_plugins"
EPOCH = 315532800  # 1980-01-01, the earliest time a zip can hold: reproducible wheels
_SKIPPED_METADATA = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


@dataclass(frozen=True)
class Wheel:
    """A wheel built here, for the instance."""

    path: Path
    distribution: str
    sha256: str

    def key(self, store: Any) -> str:
        return str(store.location.key("wheels", self.sha256, self.path.name))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normal(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


# --- which distributions ------------------------------------------------------------------------


def running_source_tree() -> Path | None:
    """The source tree the running ``studio_plugins`` is imported from, if it is one (a checkout
    on ``sys.path`` or behind an editable install): its ``pyproject.toml`` names us."""
    root = Path(studio_plugins.__file__).resolve().parents[1]
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if project.get("name") == DISTRIBUTION else None


def _direct_url(dist: importlib.metadata.Distribution) -> dict[str, Any]:
    try:
        return dict(json.loads(dist.read_text("direct_url.json") or "{}"))
    except (ValueError, TypeError):
        return {}


def _editable_tree(dist: importlib.metadata.Distribution) -> Path | None:
    """The folder an editable install points at (``direct_url.json``), if it still exists."""
    direct = _direct_url(dist)
    url = str(direct.get("url", ""))
    if not direct.get("dir_info", {}).get("editable") or not url.startswith("file:"):
        return None
    tree = Path(unquote(urlparse(url).path))
    return tree if tree.is_dir() else None


def plugin_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions that provide third-party plugins (entry points of group
    ``studio_plugins``), once each, by name. All of them travel: which loader a model needs is
    decided on the instance, from the checkpoint files there."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        if dist is not None and _normal(dist.name) != _normal(DISTRIBUTION):
            found.setdefault(_normal(dist.name), dist)
    return [found[name] for name in sorted(found)]


def module_distributions(modules: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions providing these modules (a ``--wrapper`` named as a module,
    ``pkg.wrap``), found by top-level package; a file or a registered name finds none."""
    providers = importlib.metadata.packages_distributions()
    found = []
    for module in modules:
        for name in providers.get(module.split(".")[0], []):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found.append(importlib.metadata.distribution(name))
    return found


def from_an_index(dist: importlib.metadata.Distribution) -> bool:
    """Installed by name from an index (no ``direct_url.json``), so the instance can too."""
    return not _direct_url(dist)


# --- building ----------------------------------------------------------------------------------


def _tree_files(tree: Path) -> list[str]:
    """The files of ``tree`` a build needs: git's tracked and untracked-not-ignored ones in a
    checkout (no ``.venv``, ``build/``, caches), else everything but the usual junk."""
    if (tree / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "-C", str(tree), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, timeout=60)
        if listed.returncode == 0:
            return [name for name in listed.stdout.decode().split("\0")
                    if name and (tree / name).is_file()]
    junk = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".tox", ".mypy_cache",
            ".ruff_cache", ".pytest_cache"}
    return [str(p.relative_to(tree)) for p in tree.rglob("*")
            if p.is_file() and not junk & set(p.relative_to(tree).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(tree).parts)]


_built: dict[str, tuple[str, bytes]] = {}
"""Wheels built in this process, by the digest of the tree's files: a process that launches
again (a test suite, a script) from an unchanged tree does not build again."""


def _tree_digest(tree: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + (tree / name).read_bytes() + b"\0")
    return digest.hexdigest()


def build_from_tree(tree: Path, out: Path) -> Path:
    """``pip wheel`` of a copy of ``tree`` into ``out``; the wheel's path."""
    names = _tree_files(tree)
    digest = _tree_digest(tree, names)
    if digest in _built:
        filename, data = _built[digest]
        (out / filename).write_bytes(data)
        return out / filename
    with tempfile.TemporaryDirectory(prefix="studio-plug-build-") as scratch:
        copy = Path(scratch) / tree.name
        for name in names:
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tree / name, target)
        before = set(out.iterdir())
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-q", "-w", str(out), str(copy)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH), "PIP_NO_INDEX": "1"})
    wheels = [p for p in set(out.iterdir()) - before if p.suffix == ".whl"]
    if built.returncode != 0 or len(wheels) != 1:
        last = (built.stderr.strip().splitlines() or ["no wheel came out"])[-1]
        raise ConfigurationError(
            f"could not build a wheel of {tree} for the instance: {last}",
            hint="the build needs its backend here (e.g. `pip install setuptools wheel`); or "
            "give the instance something to install with --install SPEC",
        )
    _built[digest] = (wheels[0].name, wheels[0].read_bytes())
    return wheels[0]


def _wheel_tag(dist: importlib.metadata.Distribution) -> str:
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    return tags[0] if tags else "py3-none-any"


def rebuild_from_record(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """A wheel of the installed files ``dist``'s ``RECORD`` lists (no bytecode, no scripts
    outside site-packages: pip makes those again from the entry points)."""
    name, version = _normal(dist.metadata["Name"]), dist.version
    files = dist.files
    if not files:
        raise ConfigurationError(
            f"{dist.metadata['Name']} {version} lists no files (no RECORD): cannot ship it",
            hint="reinstall it with pip, or give the instance something to install with --install",
        )
    info_dir = f"{name}-{version}.dist-info"
    path = out / f"{name}-{version}-{_wheel_tag(dist)}.whl"
    rows: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:

        def add(arcname: str, data: bytes) -> None:
            entry = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append((arcname, f"sha256={digest}", str(len(data))))

        for file in sorted(files, key=str):
            parts = file.parts
            if (".." in parts or file.is_absolute() or "__pycache__" in parts or file.suffix == ".pyc"
                    or (parts[0].endswith(".dist-info") and file.name in _SKIPPED_METADATA)):
                continue
            arcname = "/".join((info_dir, *parts[1:])) if parts[0].endswith(".dist-info") \
                else "/".join(parts)
            add(arcname, Path(str(file.locate())).read_bytes())
        if not dist.read_text("WHEEL"):  # installed by other means than a wheel: pip needs one
            add(f"{info_dir}/WHEEL", (f"Wheel-Version: 1.0\nGenerator: studio-plug\n"
                                      f"Root-Is-Purelib: true\nTag: {_wheel_tag(dist)}\n").encode())
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows([*rows, (f"{info_dir}/RECORD", "", "")])
        entry = zipfile.ZipInfo(f"{info_dir}/RECORD", date_time=(1980, 1, 1, 0, 0, 0))
        entry.external_attr = 0o644 << 16
        wheel.writestr(entry, record.getvalue(), zipfile.ZIP_DEFLATED)
    return path


def wheel_of(dist: importlib.metadata.Distribution | None, tree: Path | None, out: Path) -> Path:
    """From the source tree when there is one, else from the installed files."""
    if tree is not None:
        return build_from_tree(tree, out)
    assert dist is not None
    return rebuild_from_record(dist, out)


@dataclass(frozen=True)
class Shipment:
    """What the instance installs: ``wheels`` (built here) and ``requirements`` from the index."""

    wheels: tuple[Wheel, ...]
    requirements: tuple[str, ...]
    folder: Any = None
    """The temporary folder holding ``wheels``, removed once this is garbage (or at exit)."""


def build_shipment(modules: Iterable[str] = ()) -> Shipment:
    """Wheels of the running ``studio-plugins`` and of every plugin distribution on no index
    (in a temporary folder); ``name==version`` for the plugin distributions from an index.
    ``modules`` (wrappers named as modules) add the distributions that provide them."""
    folder = tempfile.TemporaryDirectory(prefix="studio-plug-wheels-")
    out = Path(folder.name)
    try:
        ours = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        ours = None
    tree = running_source_tree() or (_editable_tree(ours) if ours else None)
    if tree is None and ours is None:
        raise ConfigurationError(
            f"the running {DISTRIBUTION} is neither a source tree nor installed: cannot ship it",
            hint="install it with pip, or give the instance something to install with --install",
        )
    built = [(DISTRIBUTION, wheel_of(ours, tree, out))]
    requirements = []
    wanted: dict[str, importlib.metadata.Distribution] = {}
    for dist in [*plugin_distributions(), *module_distributions(modules)]:
        if _normal(dist.metadata["Name"]) != _normal(DISTRIBUTION):
            wanted.setdefault(_normal(dist.metadata["Name"]), dist)
    for dist in wanted.values():
        if from_an_index(dist):
            requirements.append(f"{dist.metadata['Name']}=={dist.version}")
        else:
            built.append((dist.metadata["Name"], wheel_of(dist, _editable_tree(dist), out)))
    wheels = tuple(Wheel(path, name, sha256_of(path)) for name, path in built)
    ours_version = zipfile_version(wheels[0].path)
    if ours_version != studio_plugins.__version__:
        raise BackendError(
            f"the wheel built of {DISTRIBUTION} is version {ours_version}, but "
            f"{studio_plugins.__version__} runs here",
            hint=f"reinstall {DISTRIBUTION} (`pip install -e .` in its tree), or use --install",
        )
    return Shipment(wheels, tuple(requirements), folder)


def zipfile_version(path: Path) -> str:
    """The ``Version`` in a wheel's ``METADATA``."""
    with zipfile.ZipFile(path) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        for line in wheel.read(names[0]).decode().splitlines() if names else []:
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "?"


# --- the store ---------------------------------------------------------------------------------


def in_store(store: Any, key: str) -> bool:
    with store.errors(f"s3://{store.location.bucket}/{key}"):
        try:
            store.client.head_object(Bucket=store.location.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return True


def upload(store: Any, wheels: tuple[Wheel, ...], undo: Callable[[str, Callable[[], Any]], None],
           say: Callable[[str], None]) -> None:
    """Upload each wheel not yet in the store; ``undo`` gets the deletion of each uploaded here
    (one already there may be another launch's: it is left alone)."""
    for wheel in wheels:
        key = wheel.key(store)
        where = f"s3://{store.location.bucket}/{key}"
        if in_store(store, key):
            say(f"{wheel.distribution}: {wheel.path.name} is in the store already ({where})")
            continue
        store.upload(wheel.path, key)
        undo(f"deleting {where}", functools.partial(store.delete, key))
        say(f"{wheel.distribution}: uploaded {wheel.path.name} to {where}")
