"""What a tar archive holds, checked header by header before anything is written.

Only regular files and directories, by relative paths that stay inside the modeldir, each named
once; declared sizes summed against the limit, member count bounded, sparse maps consistent.
One ``modeldir/`` folder around everything is unwrapped (Studio.ML's other layout).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

from plugins.stores.safe_tar_headers import MAX_SPARSE, Refused

MAX_NAME = 4096


@dataclass
class Member:
    info: tarfile.TarInfo
    name: str  # normalised, relative to the modeldir
    is_dir: bool


def _normalise(name: str) -> str:
    """``./a/b`` -> ``a/b``; ``.`` and ``./`` -> ``""`` (the root itself)."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return "" if name in (".", "") else name.rstrip("/")


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"is a symbolic link (to {info.linkname!r})"
    if info.islnk():
        return f"is a hard link (to {info.linkname!r})"
    if info.ischr() or info.isblk():
        return "is a device"
    if info.isfifo():
        return "is a FIFO"
    return f"is of type {info.type!r}"


def _check_name(info: tarfile.TarInfo, name: str) -> None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise Refused(info.name, "is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise Refused(info.name, "climbs out with '..'")
    if "\0" in name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise Refused(info.name, "has an impossible name")
    if name and "" in parts:
        raise Refused(info.name, "has an empty path component")


def _check_data(info: tarfile.TarInfo) -> None:
    sparse: list[tuple[int, int]] = info.sparse or []  # type: ignore[assignment]
    if len(sparse) > MAX_SPARSE:
        raise Refused(info.name, f"has a sparse map over {MAX_SPARSE} entries")
    end = 0
    for offset, numbytes in sparse:  # ascending, within the file: the data is read forward only
        if numbytes == 0 and offset >= 0:  # GNU tar ends its maps with empty entries
            continue
        if offset < end or numbytes < 0 or offset + numbytes > info.size:
            raise Refused(info.name, "has an inconsistent sparse map")
        end = offset + numbytes


def scan(tar: tarfile.TarFile, max_bytes: int, max_members: int) -> list[Member]:
    """Every header, checked, before anything is written."""
    members: list[Member] = []
    declared = 0
    while True:
        info = tar.next()
        if info is None:
            break
        tar.members.clear()  # type: ignore[attr-defined]  # we keep our own list, without the pax dictionaries
        if len(members) >= max_members:
            raise Refused(info.name, f"is past the limit of {max_members} members")
        name = _normalise(info.name)
        _check_name(info, name)
        if not (info.isreg() or info.isdir()):
            raise Refused(info.name, f"{_kind(info)}: only regular files and directories are "
                           "extracted")
        if info.isreg():
            _check_data(info)
            declared += info.size
            if declared > max_bytes:
                raise Refused(info.name, f"takes the archive past {human_size(max_bytes)} extracted")
        info.pax_headers = {}
        members.append(Member(info, name, info.isdir()))
    return _layout(members)


def _layout(members: list[Member]) -> list[Member]:
    """Unwrap one ``modeldir/`` folder; refuse duplicates and file/directory clashes."""
    names = [m.name for m in members if m.name]
    unwrap = bool(names) and all(n == "modeldir" or n.startswith("modeldir/") for n in names) \
        and all(m.is_dir for m in members if m.name == "modeldir")
    files: set[str] = set()
    dirs: set[str] = {""}
    kept = []
    for member in members:
        if unwrap:
            member.name = member.name.removeprefix("modeldir").lstrip("/")
        if not member.name:  # the root itself ("./"), which some writers mark as an empty file
            if not member.is_dir and member.info.size:
                raise Refused(member.info.name, "is a file in place of the modeldir itself")
            continue
        parents = _parents(member.name)
        if any(p in files for p in parents):
            raise Refused(member.info.name, "lies inside a member that is a file")
        dirs.update(parents)
        if member.is_dir:
            if member.name in files:
                raise Refused(member.info.name, "is both a file and a directory")
            dirs.add(member.name)
        else:
            if member.name in files:
                raise Refused(member.info.name, "appears twice (duplicates are refused)")
            if member.name in dirs:
                raise Refused(member.info.name, "is both a file and a directory")
            files.add(member.name)
        kept.append(member)
    return kept


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def human_size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"
