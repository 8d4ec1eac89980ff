"""Archive extraction for remote modeldirs: real tar files, written here, read back from disk."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from plugins.stores.safe_tar import _Writer, extract_archive
from plugins.stores.safe_tar_members import Member
from studio_plugins import StoreError

MTIME = 1_600_000_000


def regular(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, MTIME
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, b""


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], *, gz: bool = False,
              fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


class Box:
    """``tmp_path`` with the archive, the extraction target and a bystander folder beside it;
    ``untouched()`` says nothing but the target changed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.archive = root / "modeldir.tar"
        self.target = root / "cache" / "new"
        self.target.mkdir(parents=True)
        (root / "outside").mkdir()
        (root / "outside" / "keep.txt").write_text("keep")

    def snapshot(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")
                if p != self.archive and self.target not in p.parents and p != self.target}

    def extract(self, **limits: int) -> int:
        return extract_archive(self.archive, self.target, "s3://b/k/modeldir.tar", **limits)

    def refused(self, match: str, **limits: int) -> str:
        before = self.snapshot()
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            self.extract(**limits)
        assert time.monotonic() - started < 5
        assert match in caught.value.message, caught.value.message
        assert "\n" not in caught.value.message
        assert self.snapshot() == before  # nothing written outside the target ...
        assert list(self.target.iterdir()) == []  # ... and nothing half-extracted inside it
        assert (self.root / "outside" / "keep.txt").read_text() == "keep"
        return caught.value.message


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


# --- what must keep working -------------------------------------------------------------------


def test_studio_ml_layout_modes_and_mtimes(box: Box) -> None:
    # `tar -C modeldir -cf modeldir.tar .`: members ./name
    write_tar(box.archive, [
        special("./", tarfile.DIRTYPE),
        regular("./checkpoint.03-0.45.h5", b"W" * 3_000_000),
        regular("./run.sh", b"#!/bin/sh\n", mode=0o4777),  # setuid, world-writable
        special("./sub", tarfile.DIRTYPE),
        regular("./sub/deeper/x.txt", b"Y", mode=0o600),
    ])
    assert box.extract() == 3
    assert (box.target / "checkpoint.03-0.45.h5").read_bytes() == b"W" * 3_000_000
    assert (box.target / "checkpoint.03-0.45.h5").stat().st_mtime == MTIME
    assert stat.S_IMODE((box.target / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((box.target / "sub/deeper/x.txt").stat().st_mode) == 0o600
    assert (box.target / "sub/deeper/x.txt").read_bytes() == b"Y"


def test_one_modeldir_folder_is_unwrapped_from_a_tar_gz(box: Box) -> None:
    write_tar(box.archive, [special("modeldir", tarfile.DIRTYPE), regular("modeldir/m.h5", b"G"),
                            regular("modeldir/x/y.txt", b"Y")], gz=True)
    assert box.extract() == 2
    assert sorted(p.name for p in box.target.iterdir()) == ["m.h5", "x"]
    assert (box.target / "x" / "y.txt").read_bytes() == b"Y"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_and_non_ascii_names(box: Box, fmt: int) -> None:
    long = "/".join(["d" * 120] * 3) + "/checkpoint-é.h5"  # GNU long name / pax path record
    write_tar(box.archive, [regular(long, b"L"), regular("ok.h5", b"O")], fmt=fmt)
    assert box.extract() == 2
    assert (box.target / long).read_bytes() == b"L"
    assert (box.target / "ok.h5").read_bytes() == b"O"


def sparse_source(box: Box) -> Path:
    """A folder holding ``sparse.bin``: 4 bytes, a 5 MB hole, 4 bytes (for tar --sparse)."""
    source = box.root / "src"
    source.mkdir()
    with open(source / "sparse.bin", "wb") as handle:
        handle.write(b"head")
        handle.seek(5_000_000)
        handle.write(b"tail")
    return source


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "pax", "pax:0.1", "pax:1.0"])
def test_sparse_members_written_by_gnu_tar(box: Box, fmt: str) -> None:
    fmt, _, version = fmt.partition(":")  # old GNU 'S' members, or pax sparse 0.0, 0.1, 1.0
    source = sparse_source(box)
    (source / "plain.txt").write_text("p")
    versions = [f"--sparse-version={version}"] if version else []
    subprocess.run(["tar", f"--format={fmt}", "--sparse", *versions, "-C", str(source), "-cf",
                    str(box.archive), "."], check=True)
    assert box.extract() == 2
    data = (box.target / "sparse.bin").read_bytes()
    assert len(data) == 5_000_004 and data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:-4].count(0) == 5_000_000 - 4


# --- what must be refused, with nothing written outside the target ----------------------------


def cve_2025_4517_chain(outside: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The published proof of concept's shape: symlinks through directories with names long
    enough that ``realpath`` (the data filter's check) gives up before the chain ends. Checked
    once by hand: ``extractall(filter="data")`` on 3.11.7 writes ``outside/evil.txt`` from it."""
    members = []
    component, path = "d" * 247, ""
    for step in "abcdefghijklmnop":
        members.append(special(os.path.join(path, component), tarfile.DIRTYPE))
        members.append(special(os.path.join(path, step), tarfile.SYMTYPE, component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*"abcdefghijklmnop", "l" * 254)
    members.append(special(linkpath, tarfile.SYMTYPE, "../" * 16))
    members.append(special("escape", tarfile.SYMTYPE,
                           linkpath + "/" + "../" * 16 + str(outside).lstrip("/")))
    members.append(regular("escape/evil.txt", b"pwned"))
    return members


def test_a_cve_2025_4517_symlink_chain_is_refused(box: Box) -> None:
    write_tar(box.archive, cve_2025_4517_chain(box.root / "outside"))
    message = box.refused("is a symbolic link")
    assert "only regular files and directories" in message
    assert not (box.root / "outside" / "evil.txt").exists()


def bomb(path: Path, size: int) -> None:
    """A tar.gz with one member of ``size`` zero bytes, streamed (the test writes no big file)."""
    with gzip.open(path, "wb", compresslevel=1) as raw:
        header = tarfile.TarInfo("./weights.bin")
        header.size = size
        raw.write(header.tobuf(tarfile.USTAR_FORMAT))
        block = bytes(1 << 20)
        for _ in range(size // len(block)):
            raw.write(block)
        raw.write(bytes(2 * tarfile.BLOCKSIZE))


Case = Callable[[Box], list[tuple[tarfile.TarInfo, bytes]]]

REFUSED: dict[str, tuple[Case, str]] = {
    "symlink inside": (lambda b: [regular("a.h5"), special("b.h5", tarfile.SYMTYPE, "a.h5")],
                       "is a symbolic link"),
    "symlink out": (lambda b: [special("ln", tarfile.SYMTYPE, str(b.root / "outside")),
                               regular("ln/evil.txt")], "is a symbolic link"),
    "hard link": (lambda b: [regular("a.h5"), special("b.h5", tarfile.LNKTYPE, "a.h5")],
                  "is a hard link"),
    "hard link out": (lambda b: [special("h", tarfile.LNKTYPE, "../../outside/keep.txt")],
                      "is a hard link"),
    "device": (lambda b: [special("null", tarfile.CHRTYPE)], "is a device"),
    "block device": (lambda b: [special("sda", tarfile.BLKTYPE)], "is a device"),
    "fifo": (lambda b: [regular("a.h5"), special("pipe", tarfile.FIFOTYPE)], "is a FIFO"),
    "absolute": (lambda b: [regular(str(b.root / "outside" / "evil.txt"))], "absolute path"),
    "dot dot": (lambda b: [regular("../../outside/evil.txt")], "'..'"),
    "dot dot inside": (lambda b: [regular("./ok.h5"), regular("a/../../x")], "'..'"),
    "backslashes": (lambda b: [regular("a\\..\\..\\x")], "'..'"),
    "duplicate": (lambda b: [regular("a.h5", b"1"), regular("./a.h5", b"2")], "appears twice"),
    "file then dir": (lambda b: [regular("a"), special("a", tarfile.DIRTYPE)],
                      "both a file and a directory"),
    "file as parent": (lambda b: [regular("a"), regular("a/b")], "inside a member that is a file"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused_members(box: Box, case: str) -> None:
    members, why = REFUSED[case]
    write_tar(box.archive, [regular("./first.h5", b"F"), *members(box)])
    box.refused(why)


def test_a_gzip_bomb_is_refused_before_it_is_written(box: Box) -> None:
    bomb(box.archive, 64 << 20)
    assert box.archive.stat().st_size < 1 << 20
    box.refused("past 1 MiB extracted", max_bytes=1 << 20)


def test_the_cap_counts_every_member(box: Box) -> None:
    write_tar(box.archive, [regular(f"part{i}.bin", bytes(300_000)) for i in range(4)], gz=True)
    box.refused("'part3.bin' takes the archive past 1 MiB", max_bytes=1 << 20)
    assert box.extract(max_bytes=4 * 300_000) == 4  # exactly at the cap is fine


def test_bytes_are_counted_as_written(box: Box) -> None:
    # The header's size is checked before writing; the writer counts again, whatever it is fed.
    info = regular("big.bin", bytes(10))[0]
    writer = _Writer(box.target, max_bytes=1000)
    try:
        writer.file(Member(info, "a/big.bin", False), io.BytesIO(bytes(600)))
        with pytest.raises(Exception, match="past 1000 bytes"):
            writer.file(Member(info, "b.bin", False), io.BytesIO(bytes(600)))
    finally:
        writer.close()
    assert (box.target / "a" / "big.bin").stat().st_size == 600
    assert (box.target / "b.bin").stat().st_size <= 400


def test_too_many_members(box: Box) -> None:
    write_tar(box.archive, [regular(f"f{i}") for i in range(11)])
    box.refused("past the limit of 10 members", max_members=10)
    assert box.extract(max_members=11) == 11


def test_a_negative_size_does_not_loop(box: Box) -> None:
    # CVE-2025-8194: a base-256 negative size sends tarfile's offset backwards, forever
    first = regular("a.h5", b"A")[0].tobuf(tarfile.USTAR_FORMAT) + b"A".ljust(512, b"\0")
    second = bytearray(regular("b.h5", b"")[0].tobuf(tarfile.USTAR_FORMAT))
    second[124:136] = b"\xff" * 12  # -1
    second[148:156] = b" " * 8
    second[148:156] = b"%06o\0 " % sum(second)
    box.archive.write_bytes(first + bytes(second) + bytes(1024))
    box.refused("negative size")


def pax_archive(records: bytes) -> bytes:
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(records)
    padding = bytes(-len(records) % tarfile.BLOCKSIZE)
    member = regular("a.h5", b"")[0].tobuf(tarfile.USTAR_FORMAT)
    return pax.tobuf(tarfile.USTAR_FORMAT) + records + padding + member + bytes(1024)


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (b"4 a\n" * 15_000 + b"=", "malformed pax header"),  # quadratic in tarfile's regex loop
        (b"60010 comment=" + b"1" * 59_995 + b"\n", "run of over 32 digits"),  # hdrcharset search
        (b"70010 comment=" + b"x" * 69_995 + b"\n", "extended header"),
    ],
    ids=["malformed", "digits", "oversized"],
)
def test_hostile_pax_headers_are_refused_at_once(box: Box, records: bytes, why: str) -> None:
    box.archive.write_bytes(pax_archive(records))
    box.refused(why)


def test_a_well_formed_pax_header_is_read(box: Box) -> None:
    record = b" path=renamed.h5\n"
    box.archive.write_bytes(pax_archive(b"%d" % (len(record) + 2) + record))
    assert box.extract() == 1
    assert [p.name for p in box.target.iterdir()] == ["renamed.h5"]


def test_not_a_tar_file_is_one_line(box: Box) -> None:
    box.archive.write_bytes(b"PK\x03\x04 a zip file, not a tar")
    message = box.refused("cannot extract archive")
    assert "s3://b/k/modeldir.tar" in message


def test_a_target_that_is_not_empty_is_refused(box: Box) -> None:
    write_tar(box.archive, [regular("a.h5")])
    (box.target / "old").write_text("o")
    with pytest.raises(StoreError, match="not empty"):
        box.extract()


@pytest.mark.parametrize(
    ("keep", "tail"),
    [(3072, b"\x01" * 512), (1536 + 100, b""), (2048 + 100, b"")],
    ids=["garbage header", "cut in a header", "cut in the data"],
)
def test_a_damaged_archive_is_refused_not_served_in_part(box: Box, keep: int, tail: bytes) -> None:
    # past the first member, tarfile itself takes a bad header for the end of the archive
    write_tar(box.archive, [regular("a.h5", b"A" * 600), regular("b.h5", b"B" * 600),
                            regular("c.h5", b"C" * 600)], fmt=tarfile.USTAR_FORMAT)
    box.archive.write_bytes(box.archive.read_bytes()[:keep] + tail)
    box.refused("cannot extract archive")


def test_mutated_archives_are_extracted_or_refused_in_one_line(box: Box) -> None:
    """A short seeded mutation run over valid pax, GNU and ustar archives (plain and gzip)."""
    import random

    rng = random.Random(13)
    seeds = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        write_tar(box.archive, [regular("./a.h5", b"A" * 700), regular("d/" + "é" * 60 + "/b", b"B"),
                                special("./e", tarfile.DIRTYPE)], fmt=fmt)
        seeds.append(box.archive.read_bytes())
    outcomes = set()
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            if rng.random() < 0.6:
                data[pos] = rng.randrange(256)
            else:
                data[pos:pos + 8] = bytes(rng.choice(b"0123456789 \xff=\n") for _ in range(8))
        box.archive.write_bytes(gzip.compress(bytes(data)) if rng.random() < 0.3 else bytes(data))
        shutil.rmtree(box.target)
        started = time.monotonic()
        try:
            box.extract(max_bytes=1 << 20)
            outcomes.add("extracted")
        except StoreError as exc:
            assert "\n" not in exc.message
            outcomes.add("refused")
        assert time.monotonic() - started < 1
        assert box.snapshot() == {"cache", "outside", "outside/keep.txt"}
    assert outcomes == {"extracted", "refused"}


def gnu_tar_sparse(box: Box, *args: str) -> bytes:
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write sparse members")
    source = sparse_source(box)
    subprocess.run(["tar", "--sparse", *args, "-C", str(source), "-cf", str(box.archive),
                    "sparse.bin"], check=True)
    shutil.rmtree(source)
    return box.archive.read_bytes()


def checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def test_an_endless_old_gnu_sparse_map_is_refused(box: Box) -> None:
    # tarfile would keep every entry of every extension block in memory
    data = bytearray(gnu_tar_sparse(box, "--format=gnu"))
    header = data[:512]
    assert header[156:157] == tarfile.GNUTYPE_SPARSE
    header[482] = 1  # "an extension block follows"
    checksum(header)
    extension = bytearray((b"%011o\0" % 1 + b"%011o\0" % 1) * 21 + bytes(8))
    extension[504] = 1
    box.archive.write_bytes(bytes(header) + bytes(extension) * 600 + bytes(data[512:]))
    box.refused("sparse map over 10000 entries")


def test_an_oversized_pax_sparse_map_is_refused(box: Box) -> None:
    data = gnu_tar_sparse(box, "--format=pax", "--sparse-version=1.0")
    start = data.index(b"3\n0\n4096\n")
    box.archive.write_bytes(data[:start] + b"99999\n" + data[start + 6:])
    box.refused("sparse map over 10000 entries")
