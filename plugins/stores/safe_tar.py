"""Extract a modeldir archive (tar or tar.gz) without trusting anything in it.

What is extracted: regular files (sparse and GNU long-name ones included) and directories, and
nothing else. A link (symbolic or hard), device, FIFO or member of an unknown type refuses the
*whole* archive, as does a path that is absolute, climbs with ``..``, or names one file twice
(duplicates are refused rather than "last wins": what is served must not depend on member order)
or as both a file and a directory. Every header is checked before a byte is written.

Limits (parameters of :func:`extract_archive`):

- ``max_bytes`` (default 64 GiB, and never more than the target disk's free space less 1 GiB):
  the total extracted size. Declared sizes are summed before writing, and bytes are counted again
  as they are written, so a gzip bomb is refused before it fills the disk.
- ``max_members`` (default 100,000): members of any kind, headers included in the count.

The interpreter's own extraction (and its ``data`` filter: CVE-2025-4517, CVE-2024-12718,
CVE-2025-4138, CVE-2025-4330, CVE-2025-4435 on this Python) is not used: each file is created
by us, walking down from a descriptor of the target directory one component at a time with
``O_NOFOLLOW`` (no symlink is ever followed, pre-existing or not), opened ``O_CREAT | O_EXCL``,
its parent checked with ``realpath`` to lie inside the target, its data streamed in chunks, its
mode stripped of setuid/setgid/sticky and group/world write. Directories are created 0o755.

``tarfile`` still parses the headers, through :class:`_Header`, which refuses negative sizes
(CVE-2025-8194's endless loop), pax and GNU long-name headers over 64 KiB, pax records that are
malformed or hold long digit runs (the header regexes backtrack quadratically on those:
CVE-2024-6232), sparse maps over 10,000 entries (each one is held in memory), and any header
that does not parse (``tarfile`` takes one past the first member for the end of the archive, and
a damaged archive would be served in part).

Studio.ML wrote its archives with ``tar -C modeldir -cf modeldir.tar .`` (members ``./file``);
an archive holding one ``modeldir/`` folder is unwrapped. Only plain and gzip-compressed tar are
read (the store's names are ``modeldir.tar``, ``.tar.gz``, ``.tgz``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from studio_plugins import StoreError

DEFAULT_MAX_BYTES = 64 << 30
DEFAULT_MAX_MEMBERS = 100_000
DISK_RESERVE = 1 << 30
"""Free space an extraction always leaves on the target's file system."""
MAX_METADATA = 64 << 10
"""Largest pax or GNU long-name header: a path is at most 4 KiB; ``tarfile`` holds it whole."""
MAX_SPARSE = 10_000
MAX_NAME = 4096
_CHUNK = 1 << 20
_LONG_DIGITS = re.compile(rb"\d{33}")
_nti = tarfile.nti  # type: ignore[attr-defined]
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_MEMBERS", "extract_archive"]


class _Refused(Exception):
    """A member (or header) the archive must be refused for. Not a ``tarfile.HeaderError``:
    ``TarFile.next`` takes those, past the first member, for the end of the archive."""

    def __init__(self, member: str, why: str, *, header: int | None = None) -> None:
        super().__init__(why)
        self.where = f"the header at byte {header}" if header is not None else f"member {member!r}"
        self.why = why


class _Damaged(Exception):
    """A header that does not parse. ``TarFile.next`` would take it for the end of the archive
    (past the first member) and a truncated modeldir would be served as if whole."""


# --- header parsing: tarfile's parser, with its unbounded paths bounded ------------------------


# Overriding _proc_* is tarfile's documented way to extend its parser; typeshed omits them.
_TarInfo: Any = tarfile.TarInfo


class _Header(_TarInfo):
    """``tarfile.TarInfo`` that refuses the headers ``tarfile`` itself mishandles on 3.11."""

    size: int

    @classmethod
    def fromtarfile(cls, tar: Any) -> Any:
        offset = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except _BAD_HEADER as exc:
            # EOFHeaderError (zero blocks) and EmptyHeaderError (no more data) are real ends
            raise _Damaged(f"the header at byte {offset} is damaged ({exc})") from None

    def _block(self, count: int) -> int:
        if count < 0:  # CVE-2025-8194: a negative size moves the offset back: an endless loop
            raise _Refused("", "holds a negative size or offset", header=self.offset)
        return int(super()._block(count))

    def _proc_member(self, tar: Any) -> Any:
        if self.size < 0:
            raise _Refused("", "holds a negative size", header=self.offset)
        metadata = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type in metadata and self.size > MAX_METADATA:
            raise _Refused("", f"is a {self.size}-byte extended header (at most {MAX_METADATA})",
                           header=self.offset)
        return super()._proc_member(tar)

    def _proc_pax(self, tar: Any) -> Any:
        # Read the records, check them, then let tarfile parse the very same bytes.
        real = tar.fileobj
        buf = real.read(self._block(self.size))
        _check_pax(buf[: self.size], self.offset)
        tar.fileobj = _Replay(buf, real)
        try:
            return super()._proc_pax(tar)
        finally:
            tar.fileobj = real

    def _proc_sparse(self, tar: Any) -> Any:
        """Old GNU sparse (type ``S``): as tarfile's, with the map bounded."""
        structs, isextended, origsize = self._sparse_structs  # set by frombuf
        del self._sparse_structs
        while isextended:
            buf = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                raise _Refused("", "is a truncated sparse header", header=self.offset)
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = _nti(buf[pos:pos + 12])
                    numbytes = _nti(buf[pos + 12:pos + 24])
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            if len(structs) > MAX_SPARSE:
                raise _Refused("", f"holds a sparse map over {MAX_SPARSE} entries",
                               header=self.offset)
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + self._block(self.size)
        self.size = int(origsize)
        return self

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tar: Any) -> None:
        """GNU sparse 1.0 (a map in the data blocks): as tarfile's, with the map bounded."""
        buf = tar.fileobj.read(tarfile.BLOCKSIZE)
        fields_text, buf = buf.split(b"\n", 1)
        if len(fields_text) > 8 or int(fields_text) > MAX_SPARSE:
            raise _Refused("", f"holds a sparse map over {MAX_SPARSE} entries", header=self.offset)
        numbers: list[int] = []
        while len(numbers) < int(fields_text) * 2:
            if b"\n" not in buf:
                more = tar.fileobj.read(tarfile.BLOCKSIZE)
                if not more or len(buf) > 64:
                    raise _Refused("", "holds a malformed sparse map", header=self.offset)
                buf += more
                continue
            number, buf = buf.split(b"\n", 1)
            numbers.append(int(number))
        next.offset_data = tar.fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))


class _Replay:
    """The file, with ``buf`` (already read from it) put back in front."""

    def __init__(self, buf: bytes, real: IO[bytes]) -> None:
        self.buf = buf
        self.real = real

    def read(self, size: int = -1) -> bytes:
        if not self.buf:
            return self.real.read(size)
        if size < 0 or size > len(self.buf):
            head, self.buf = self.buf, b""
            return head + self.real.read(-1 if size < 0 else size - len(head))
        head, self.buf = self.buf[:size], self.buf[size:]
        return head

    def tell(self) -> int:
        return self.real.tell() - len(self.buf)


def _check_pax(data: bytes, offset: int) -> None:
    """Records ``"%d %s=%s\\n"`` end to end, in linear time, and no digit run tarfile's regexes
    would backtrack over (``\\d+ hdrcharset=`` is searched over the whole header)."""
    if _LONG_DIGITS.search(data):
        raise _Refused("", "is a pax header with a run of over 32 digits", header=offset)
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise _Refused("", "is a malformed pax header", header=offset)
        length = int(digits)
        record = data[pos:pos + length]
        equals = record.find(b"=", space - pos + 2)  # the keyword is at least one byte
        if length < 5 or len(record) < length or not record.endswith(b"\n") or equals < 0:
            raise _Refused("", "is a malformed pax header", header=offset)
        pos += length


# --- what the archive holds ---------------------------------------------------------------------


@dataclass
class _Member:
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
        raise _Refused(info.name, "is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise _Refused(info.name, "climbs out with '..'")
    if "\0" in name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise _Refused(info.name, "has an impossible name")
    if name and "" in parts:
        raise _Refused(info.name, "has an empty path component")


def _check_data(info: tarfile.TarInfo) -> None:
    sparse: list[tuple[int, int]] = info.sparse or []  # type: ignore[assignment]
    if len(sparse) > MAX_SPARSE:
        raise _Refused(info.name, f"has a sparse map over {MAX_SPARSE} entries")
    end = 0
    for offset, numbytes in sparse:  # ascending, within the file: the data is read forward only
        if numbytes == 0 and offset >= 0:  # GNU tar ends its maps with empty entries
            continue
        if offset < end or numbytes < 0 or offset + numbytes > info.size:
            raise _Refused(info.name, "has an inconsistent sparse map")
        end = offset + numbytes


def _scan(tar: tarfile.TarFile, max_bytes: int, max_members: int) -> list[_Member]:
    """Every header, checked, before anything is written."""
    members: list[_Member] = []
    declared = 0
    while True:
        info = tar.next()
        if info is None:
            break
        tar.members.clear()  # type: ignore[attr-defined]  # we keep our own list, without the pax dictionaries
        if len(members) >= max_members:
            raise _Refused(info.name, f"is past the limit of {max_members} members")
        name = _normalise(info.name)
        _check_name(info, name)
        if not (info.isreg() or info.isdir()):
            raise _Refused(info.name, f"{_kind(info)}: only regular files and directories are "
                           "extracted")
        if info.isreg():
            _check_data(info)
            declared += info.size
            if declared > max_bytes:
                raise _Refused(info.name, f"takes the archive past {_size(max_bytes)} extracted")
        info.pax_headers = {}
        members.append(_Member(info, name, info.isdir()))
    return _layout(members)


def _layout(members: list[_Member]) -> list[_Member]:
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
                raise _Refused(member.info.name, "is a file in place of the modeldir itself")
            continue
        parents = _parents(member.name)
        if any(p in files for p in parents):
            raise _Refused(member.info.name, "lies inside a member that is a file")
        dirs.update(parents)
        if member.is_dir:
            if member.name in files:
                raise _Refused(member.info.name, "is both a file and a directory")
            dirs.add(member.name)
        else:
            if member.name in files:
                raise _Refused(member.info.name, "appears twice (duplicates are refused)")
            if member.name in dirs:
                raise _Refused(member.info.name, "is both a file and a directory")
            files.add(member.name)
        kept.append(member)
    return kept


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# --- writing ------------------------------------------------------------------------------------


class _Writer:
    """Creates files and directories under ``root``, never leaving it, and counts the bytes."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.max_bytes = max_bytes
        self.written = 0

    def close(self) -> None:
        os.close(self.root_fd)

    @contextlib.contextmanager
    def directory(self, relative: str) -> Iterator[int]:
        """A descriptor of ``root/relative``, each component created if missing and opened
        without following a symlink; checked to resolve inside ``root``."""
        fd = os.dup(self.root_fd)
        try:
            for part in relative.split("/") if relative else []:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=fd)
                os.close(fd)
                fd = child
            real = os.path.realpath(os.path.join(self.root, relative))
            if real != self.real_root and not real.startswith(self.real_root + os.sep):
                raise _Refused(relative, "resolves outside the target directory")
            opened, named = os.fstat(fd), os.stat(real)
            if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
                raise _Refused(relative, "changed while it was being extracted")
            yield fd
        finally:
            os.close(fd)

    def file(self, member: _Member, source: IO[bytes]) -> None:
        parent, _, base = member.name.rpartition("/")
        with self.directory(parent) as dir_fd:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(base, flags, 0o600, dir_fd=dir_fd)
        with open(fd, "wb", closefd=True) as out:
            while chunk := source.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise _Refused(member.info.name,
                                   f"takes the archive past {_size(self.max_bytes)} extracted")
                out.write(chunk)
            out.flush()
            # no setuid/setgid/sticky, no group or world write; the owner can always read it
            os.fchmod(fd, (member.info.mode & 0o755) | 0o600)
            with contextlib.suppress(OverflowError, ValueError, OSError):
                os.utime(fd, (member.info.mtime, member.info.mtime))


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"


def _open(archive: Path) -> tarfile.TarFile:
    with open(archive, "rb") as handle:
        magic = handle.read(2)
    mode = "r:gz" if magic == b"\x1f\x8b" else "r:"
    return tarfile.open(archive, mode, tarinfo=_Header)  # type: ignore[call-overload]


def _unsafe(label: str, refused: _Refused) -> StoreError:
    return StoreError(
        f"refusing archive {label}: {refused.where} {refused.why}",
        hint="a modeldir archive holds regular files and directories, by relative paths; "
        "rebuild it with `tar -C MODELDIR -cf modeldir.tar .`",
    )


def extract_archive(
    archive: Path,
    target: Path,
    label: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> int:
    """Extract ``archive`` into ``target`` (created if missing, else it must be empty); returns
    the number of files. On any refusal or error ``target`` is left empty."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise StoreError(f"cannot extract archive {label}: {target} is not empty")
    free = shutil.disk_usage(target).free
    limit = min(max_bytes, max(0, free - DISK_RESERVE))
    try:
        with _open(archive) as tar:
            try:
                members = _scan(tar, limit, max_members)
            except _Refused as refused:
                if limit < max_bytes and "extracted" in refused.why:
                    refused.why += f" (the disk has {_size(free)} free)"
                raise
            writer = _Writer(target, limit)
            try:
                for member in members:
                    if member.is_dir:
                        with writer.directory(member.name):
                            pass
                        continue
                    source = tar.extractfile(member.info)
                    assert source is not None  # a regular file always has data
                    with source:
                        writer.file(member, source)
            finally:
                writer.close()
    except BaseException as exc:
        _empty(target)
        if isinstance(exc, _Refused):
            raise _unsafe(label, exc) from None
        if isinstance(exc, _Damaged | tarfile.TarError | EOFError | OSError | ValueError | RecursionError
                      | zlib.error | UnicodeError):
            raise StoreError(
                f"cannot extract archive {label}: {exc}",
                hint="the archive is damaged or not a tar file; push it again",
            ) from None
        raise
    return sum(1 for m in members if not m.is_dir)


def _empty(target: Path) -> None:
    with contextlib.suppress(OSError):
        for entry in target.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

