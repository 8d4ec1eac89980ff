"""Extract a modeldir archive without letting any member land outside the target directory.

Our own checks refuse the whole archive on the first member that is absolute, climbs with
``..``, is a link pointing out, or is a device/FIFO; ``tarfile``'s ``data`` filter then guards
the extraction itself (permissions, ownership, anything we missed). Studio.ML wrote its archives
with ``tar -C modeldir .`` (members ``./file``); an archive holding one ``modeldir/`` folder is
unwrapped too.
"""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path

from studio_plugins import StoreError


def _unsafe(label: str, member: str, why: str) -> StoreError:
    return StoreError(
        f"refusing archive {label}: member {member!r} {why}",
        hint="the archive must hold relative paths inside the modeldir; rebuild it with "
        "`tar -C MODELDIR -cf modeldir.tar .`",
    )


def _normalise(name: str) -> str:
    """``./a/b`` -> ``a/b``; ``.`` and ``./`` -> ``""`` (the root itself)."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return "" if name in (".", "") else name.rstrip("/")


def _check(label: str, member: tarfile.TarInfo, name: str) -> None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _unsafe(label, member.name, "is an absolute path")
    if ".." in name.split("/"):
        raise _unsafe(label, member.name, "climbs out with '..'")
    if member.isdev() or member.isfifo():
        raise _unsafe(label, member.name, "is a device or FIFO")
    if member.issym() or member.islnk():
        target = member.linkname.replace("\\", "/")
        if target.startswith("/"):
            raise _unsafe(label, member.name, f"links to the absolute path {target!r}")
        # a symlink is relative to its own folder; a hard link to the archive root
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, _normalise(target)))
        if resolved == ".." or resolved.startswith("../"):
            raise _unsafe(label, member.name, f"links outside the modeldir ({target!r})")


def _common_root(names: list[str]) -> str | None:
    """``modeldir`` when every member lives under ``modeldir/`` (or is that folder itself)."""
    files = [n for n in names if n]
    if files and all(n == "modeldir" or n.startswith("modeldir/") for n in files):
        return "modeldir"
    return None


def extract_archive(archive: Path, target: Path, label: str) -> int:
    """Extract ``archive`` (tar, tar.gz, ...) into ``target``; returns the number of files."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            names = [_normalise(m.name) for m in members]
            for member, name in zip(members, names, strict=True):
                _check(label, member, name)
            root = _common_root(names)
            safe: list[tarfile.TarInfo] = []
            for member, name in zip(members, names, strict=True):
                if root:
                    name = name.removeprefix(root).lstrip("/")
                if not name:
                    continue
                linkname = member.linkname
                if member.islnk():  # hard links name archive paths: rebase them too
                    linkname = _normalise(linkname)
                    if root:
                        linkname = linkname.removeprefix(root).lstrip("/")
                safe.append(member.replace(name=name, linkname=linkname, deep=False))
            target.mkdir(parents=True, exist_ok=True)
            tar.extractall(target, members=safe, filter="data")
    except tarfile.FilterError as exc:  # our checks passed, the data filter still objected
        raise _unsafe(label, exc.tarinfo.name, str(exc)) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StoreError(
            f"cannot extract archive {label}: {exc}",
            hint="the archive is damaged or not a tar file; push it again",
        ) from None
    return sum(1 for m in safe if m.isfile())
