"""Tar headers read by ``tarfile``'s own parser, with the paths it leaves unbounded bounded.

``tarfile`` parses the headers, through :class:`Header`, which refuses negative sizes
(CVE-2025-8194's endless loop), pax and GNU long-name headers over 64 KiB, pax records that are
malformed or hold long digit runs (the header regexes backtrack quadratically on those:
CVE-2024-6232), sparse maps over 10,000 entries (each one is held in memory), and any header
that does not parse (``tarfile`` takes one past the first member for the end of the archive, and
a damaged archive would be served in part).

A header refused here raises ``Refused`` (the whole archive is refused, saying which header and
why); one that does not parse raises ``Damaged``. Both are shared by the member checks and the
writer (plugins/stores/safe_tar.py).
"""

from __future__ import annotations

import re
import tarfile
from typing import IO, Any

MAX_METADATA = 64 << 10
"""Largest pax or GNU long-name header: a path is at most 4 KiB; ``tarfile`` holds it whole."""
MAX_SPARSE = 10_000
_LONG_DIGITS = re.compile(rb"\d{33}")
_nti = tarfile.nti  # type: ignore[attr-defined]
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]


class Refused(Exception):
    """A member (or header) the archive must be refused for. Not a ``tarfile.HeaderError``:
    ``TarFile.next`` takes those, past the first member, for the end of the archive."""

    def __init__(self, member: str, why: str, *, header: int | None = None) -> None:
        super().__init__(why)
        self.where = f"the header at byte {header}" if header is not None else f"member {member!r}"
        self.why = why


class Damaged(Exception):
    """A header that does not parse. ``TarFile.next`` would take it for the end of the archive
    (past the first member) and a truncated modeldir would be served as if whole."""


# Overriding _proc_* is tarfile's documented way to extend its parser; typeshed omits them.
_TarInfo: Any = tarfile.TarInfo


class Header(_TarInfo):
    """``tarfile.TarInfo`` that refuses the headers ``tarfile`` itself mishandles on 3.11."""

    size: int

    @classmethod
    def fromtarfile(cls, tar: Any) -> Any:
        offset = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except _BAD_HEADER as exc:
            # EOFHeaderError (zero blocks) and EmptyHeaderError (no more data) are real ends
            raise Damaged(f"the header at byte {offset} is damaged ({exc})") from None

    def _block(self, count: int) -> int:
        if count < 0:  # CVE-2025-8194: a negative size moves the offset back: an endless loop
            raise Refused("", "holds a negative size or offset", header=self.offset)
        return int(super()._block(count))

    def _proc_member(self, tar: Any) -> Any:
        if self.size < 0:
            raise Refused("", "holds a negative size", header=self.offset)
        metadata = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type in metadata and self.size > MAX_METADATA:
            raise Refused("", f"is a {self.size}-byte extended header (at most {MAX_METADATA})",
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
                raise Refused("", "is a truncated sparse header", header=self.offset)
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = _nti(buf[pos:pos + 12])
                    numbytes = _nti(buf[pos + 12:pos + 24])
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            if len(structs) > MAX_SPARSE:
                raise Refused("", f"holds a sparse map over {MAX_SPARSE} entries",
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
            raise Refused("", f"holds a sparse map over {MAX_SPARSE} entries", header=self.offset)
        numbers: list[int] = []
        while len(numbers) < int(fields_text) * 2:
            if b"\n" not in buf:
                more = tar.fileobj.read(tarfile.BLOCKSIZE)
                if not more or len(buf) > 64:
                    raise Refused("", "holds a malformed sparse map", header=self.offset)
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
        raise Refused("", "is a pax header with a run of over 32 digits", header=offset)
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise Refused("", "is a malformed pax header", header=offset)
        length = int(digits)
        record = data[pos:pos + length]
        equals = record.find(b"=", space - pos + 2)  # the keyword is at least one byte
        if length < 5 or len(record) < length or not record.endswith(b"\n") or equals < 0:
            raise Refused("", "is a malformed pax header", header=offset)
        pos += length
