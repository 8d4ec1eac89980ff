"""Building ``.npz`` bodies byte by byte, lies included: sizes, CRCs, flags and methods that
``zipfile`` would never write. Used by the codec's tests and to write corpus files."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np


def npy(descr: str, shape: tuple[int, ...], data: bytes = b"", fortran: bool = False,
        version: int = 1, header: str | None = None, length: int | None = None) -> bytes:
    """A ``.npy`` file: magic, version, header length (``length`` may lie), header, data."""
    text = header if header is not None else (
        f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    )
    raw = text.encode("latin-1") + b"\n"
    packed = struct.pack("<H" if version == 1 else "<I", len(raw) if length is None else length)
    return b"\x93NUMPY" + bytes([version, 0]) + packed + raw + data


def savez(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@dataclass
class Member:
    name: str
    data: bytes
    method: int = 0
    """0 stored, 8 deflated, 12 bzip2 ..."""
    declared: int | None = None
    """The uncompressed size the headers claim (None: the truth)."""
    crc: int | None = None
    flags: int = 0
    zip64: bool = False


def zip_bytes(*members: Member) -> bytes:
    """A zip archive of ``members``, written exactly as described."""
    out = bytearray()
    directory = bytearray()
    for member in members:
        payload = zlib.compress(member.data)[2:-4] if member.method == 8 else member.data
        size = len(member.data) if member.declared is None else member.declared
        crc = zlib.crc32(member.data) if member.crc is None else member.crc
        name = member.name.encode()
        flags = member.flags | (0 if member.name.isascii() else 0x800)  # names in UTF-8
        extra = b""
        small_size, small_compressed = size, len(payload)
        if member.zip64:
            extra = struct.pack("<HHQQ", 1, 16, size, len(payload))
            small_size = small_compressed = 0xFFFFFFFF
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, flags, member.method, 0, 0,
                           crc, small_compressed, small_size, len(name), len(extra))
        out += name + extra + payload
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, flags, member.method,
                                 0, 0, crc, small_compressed, small_size, len(name), len(extra), 0,
                                 0, 0, 0, offset)
        directory += name + extra
    start = len(out)
    out += directory
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                       len(directory), start, 0)
    return bytes(out)
