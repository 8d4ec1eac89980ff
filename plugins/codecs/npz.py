"""``.npz`` bodies (``numpy.savez``, ``savez_compressed``): one array per name.

Read as data, with every size checked before it is inflated or allocated (``np.load`` would
inflate a member whole, trust its header's shape, and hand back non-``.npy`` members as raw
bytes):

- the archive: at most ``MAX_MEMBERS`` members in a central directory of at most
  ``MAX_DIRECTORY`` bytes (checked from the end record, before ``zipfile`` parses a single entry:
  a 64 MiB body of empty entries would take seconds), no two with the same name, each stored or
  deflated, not encrypted;
- each member: a ``.npy`` header of at most ``MAX_HEADER`` bytes; a plain dtype (no objects,
  no structured or subarray dtypes, no zero-width strings); at most ``MAX_NDIM`` dims; its
  declared uncompressed size exactly the header plus shape x itemsize;
- all members' data together within ``limit`` (``--max-body``): a ``PayloadTooLarge`` before
  anything is inflated. The member is then inflated into the array's own memory, never past the
  size checked, and must end exactly there (zip headers can lie; the CRC is checked).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from studio_plugins import BadRequest, Codec, Payload, PayloadTooLarge, Reply, hookimpl

from .npz_header import ArrayHeader, read_header

MAX_MEMBERS = 1024
MAX_DIRECTORY = 1 << 20
CHUNK = 1 << 20
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# what a hostile archive can make zipfile, zlib or the header parser raise
_INVALID = (
    ValueError, OSError, EOFError, KeyError, struct.error, zipfile.BadZipFile, zipfile.LargeZipFile,
    zlib.error, NotImplementedError, RuntimeError,
)


def _archive(body: bytes) -> zipfile.ZipFile:
    stream = io.BytesIO(body)
    end = zipfile._EndRecData(stream)  # type: ignore[attr-defined]  # the end record, unparsed entries
    if not end:
        raise BadRequest("invalid npz body: not a zip archive")
    if end[zipfile._ECD_SIZE] > MAX_DIRECTORY:  # type: ignore[attr-defined]
        raise BadRequest(
            f"npz body: its zip directory is {end[zipfile._ECD_SIZE]} bytes; "  # type: ignore[attr-defined]
            f"at most {MAX_DIRECTORY} are read (a dict of at most {MAX_MEMBERS} arrays)"
        )
    archive = zipfile.ZipFile(stream)
    if len(archive.filelist) > MAX_MEMBERS:
        raise BadRequest(f"npz body has {len(archive.filelist)} members; at most {MAX_MEMBERS} arrays")
    return archive


def _key(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if info.flag_bits & 0x1:
        raise BadRequest(f"npz member {name!r} is encrypted")
    if info.compress_type not in _COMPRESSIONS:
        raise BadRequest(f"npz member {name!r}: compression {info.compress_type} is not supported; "
                         "numpy.savez and savez_compressed write stored or deflated members")
    return name[:-4] if name.endswith(".npy") else name  # as np.load names them


def _read_into(member: Any, array: np.ndarray, name: str) -> None:
    """Inflate exactly ``array.nbytes`` bytes into the array's memory, then expect the end."""
    memory = array.view(np.uint8).reshape(-1) if array.size else np.empty(0, np.uint8)
    filled = 0
    while filled < memory.size:
        chunk = member.read(min(CHUNK, memory.size - filled))
        if not chunk:
            raise BadRequest(f"npz member {name!r} ends before its {array.nbytes} bytes of data")
        memory[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
        filled += len(chunk)
    if member.read(1):  # also makes zipfile check the CRC
        raise BadRequest(f"npz member {name!r} has data past its declared shape")


def _load(archive: zipfile.ZipFile, limit: int) -> Payload:
    infos = archive.infolist()
    keys = [_key(info) for info in infos]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise BadRequest(f"npz body names the array {duplicate!r} twice")
    left = limit
    declared = sum(info.file_size for info in infos)
    if declared > limit + MAX_MEMBERS * 4096:  # headers are small: refuse before opening any
        raise PayloadTooLarge(f"npz body declares {declared} bytes of members; the limit is {limit} "
                              "(--max-body)")
    payload: Payload = {}
    for info, key in zip(infos, keys, strict=True):
        with archive.open(info) as member:
            header: ArrayHeader = read_header(member, key)
            nbytes = header.nbytes
            if nbytes > left:
                raise PayloadTooLarge(
                    f"npz array {key!r} holds {nbytes} bytes; the decoded arrays may hold {limit} "
                    f"(--max-body) and {left} are left"
                )
            if info.file_size != header.length + nbytes:
                raise BadRequest(
                    f"npz member {info.filename!r} declares {info.file_size} bytes but its header "
                    f"says {header.length} + {nbytes}"
                )
            left -= nbytes
            flat = np.empty(header.count, header.dtype)
            _read_into(member, flat, key)
        payload[key] = flat.reshape(header.shape, order="F" if header.fortran_order else "C")
    return payload


class NpzCodec(Codec):
    name = "npz"
    media_types = ("application/x-npz",)

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")

    def decode(self, body: bytes, limit: int) -> Payload:
        try:
            return _load(_archive(body), limit)
        except (BadRequest, PayloadTooLarge):
            raise
        except _INVALID as exc:
            raise BadRequest(f"invalid npz body: {type(exc).__name__}: {str(exc)[:200]}") from None

    def encode(self, payload: Payload) -> bytes:
        """What ``numpy.savez`` writes, without passing names as its keyword arguments: an
        input named ``file`` (or ``allow_pickle``) echoed back made ``np.savez`` fail.

        A key the model failed on (a ``Reply``'s ``None``) is left out: an archive of arrays
        cannot hold ``None``, and the reply's ``X-Studio-Failed-Keys`` header names it."""
        failed = frozenset(payload.failed) if isinstance(payload, Reply) else frozenset()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in payload.items():
                if value is None and name in failed:
                    continue
                array = np.asarray(value)
                if array.dtype.hasobject:
                    raise TypeError(f"output {name!r} is not an array of numbers or strings")
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
        return buffer.getvalue()


@hookimpl
def studio_register_codecs(register: Callable[[Codec], None]) -> None:
    register(NpzCodec())

