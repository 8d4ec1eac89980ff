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

The headers are parsed by ``tarfile`` with its unbounded paths bounded
(plugins/stores/safe_tar_headers.py); every member is checked, and the layout decided, before a
byte is written (plugins/stores/safe_tar_members.py); this module writes what passed.

Studio.ML wrote its archives with ``tar -C modeldir -cf modeldir.tar .`` (members ``./file``);
an archive holding one ``modeldir/`` folder is unwrapped. Only plain and gzip-compressed tar are
read (the store's names are ``modeldir.tar``, ``.tar.gz``, ``.tgz``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from plugins.stores.safe_tar_headers import Damaged, Header, Refused
from plugins.stores.safe_tar_members import Member, human_size, scan
from studio_plugins import StoreError

DEFAULT_MAX_BYTES = 64 << 30
DEFAULT_MAX_MEMBERS = 100_000
DISK_RESERVE = 1 << 30
"""Free space an extraction always leaves on the target's file system."""
_CHUNK = 1 << 20

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_MEMBERS", "extract_archive"]


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
                raise Refused(relative, "resolves outside the target directory")
            opened, named = os.fstat(fd), os.stat(real)
            if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
                raise Refused(relative, "changed while it was being extracted")
            yield fd
        finally:
            os.close(fd)

    def file(self, member: Member, source: IO[bytes]) -> None:
        parent, _, base = member.name.rpartition("/")
        with self.directory(parent) as dir_fd:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(base, flags, 0o600, dir_fd=dir_fd)
        with open(fd, "wb", closefd=True) as out:
            while chunk := source.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise Refused(member.info.name,
                                   f"takes the archive past {human_size(self.max_bytes)} extracted")
                out.write(chunk)
            out.flush()
            # no setuid/setgid/sticky, no group or world write; the owner can always read it
            os.fchmod(fd, (member.info.mode & 0o755) | 0o600)
            with contextlib.suppress(OverflowError, ValueError, OSError):
                os.utime(fd, (member.info.mtime, member.info.mtime))


def _open(archive: Path) -> tarfile.TarFile:
    with open(archive, "rb") as handle:
        magic = handle.read(2)
    mode = "r:gz" if magic == b"\x1f\x8b" else "r:"
    return tarfile.open(archive, mode, tarinfo=Header)  # type: ignore[call-overload]


def _unsafe(label: str, refused: Refused) -> StoreError:
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
                members = scan(tar, limit, max_members)
            except Refused as refused:
                if limit < max_bytes and "extracted" in refused.why:
                    refused.why += f" (the disk has {human_size(free)} free)"
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
        if isinstance(exc, Refused):
            raise _unsafe(label, exc) from None
        if isinstance(exc, Damaged | tarfile.TarError | EOFError | OSError | ValueError | RecursionError
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
