"""The S3 store against moto's standalone server: boto3 speaks real HTTP to it."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from plugins.stores.s3 import S3Store, open_s3_store, parse_s3_url
from studio_plugins import ExperimentError, StoreError
from studio_plugins.cli import build_cli
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess, make_host

BUCKET = "models"
STORE = f"s3://{BUCKET}/team/a"
PREFIX = "team/a/experiments"


@pytest.fixture
def s3(aws):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def store() -> S3Store:
    result = open_s3_store(STORE)
    assert isinstance(result, S3Store)
    return result


def write_files(directory: Path, files: dict[str, bytes], mtime: float | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return directory


def tar_bytes(members: dict[str, bytes], *, gzip: bool = False, mtime: float = 1_600_000_000,
              links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_cli(make_host()), list(args))
    return result.exit_code, result.stdout, result.stderr


# --- URLs ---------------------------------------------------------------------------------


def test_url_parsing_and_unsafe_prefixes() -> None:
    assert parse_s3_url("s3://b-1/x/y/").prefix == "x/y"
    assert parse_s3_url("s3://b-1").url == "s3://b-1"
    for bad in ("s3:///x", "s3://b/../x", "s3://b/./x", "s3://bad bucket/x", "file:///x"):
        with pytest.raises(StoreError):
            parse_s3_url(bad)


# --- push, ls, fetch and refresh ------------------------------------------------------------


def test_push_and_ls_through_the_cli(s3, tmp_path: Path) -> None:
    source = write_files(tmp_path / "ckpt", {"old.h5": b"1", "new.keras": b"22", "notes.txt": b"n"})
    os.utime(source / "old.h5", (1_600_000_000, 1_600_000_000))
    code, out, err = cli("experiments", "push", "exp1", str(source), "--store", STORE)
    assert code == 0, err
    assert f"pushed 3 file(s) to exp1 in {STORE}" in out
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == [f"{PREFIX}/exp1/modeldir/{n}" for n in ("new.keras", "notes.txt", "old.h5")]
    head = s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/exp1/modeldir/old.h5")
    assert float(head["Metadata"]["mtime"]) == 1_600_000_000

    code, out, err = cli("experiments", "ls", "--store", STORE)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["KEY", "NEWEST"]
    assert lines[1].split()[0] == "exp1" and " 3" in lines[1]

    # one file pushed on its own; one experiment's files, fetched into the cache as serve does
    single = write_files(tmp_path / "more", {"later.pt": b"not torch"}, mtime=1_500_000_000)
    code, out, err = cli("experiments", "push", "exp1", str(single / "later.pt"), "--store", STORE)
    assert code == 0 and f"pushed 1 file(s) to exp1 in {STORE}" in out, err
    code, out, err = cli("experiments", "ls", "exp1", "--store", STORE)
    assert code == 0, err
    rows = {line.lstrip("* ").split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"new.keras", "notes.txt", "old.h5", "later.pt"}
    assert rows["new.keras"].startswith("*") and "2020-09-13 12:26:40" in rows["old.h5"]
    assert "2017-07-14 02:40:00" in rows["later.pt"]


def test_unchanged_remote_is_not_downloaded_again_and_a_change_always_is(s3, aws, tmp_path: Path) -> None:
    source = write_files(tmp_path / "v1", {"a.bin": b"A1", "b.bin": b"B1", "sub/c.bin": b"C1"},
                         mtime=1_600_000_000)
    store().push("exp", source)
    aws.requests.clear()

    modeldir = store().modeldir("exp")
    assert (modeldir / "a.bin").read_bytes() == b"A1"
    assert (modeldir / "sub" / "c.bin").read_bytes() == b"C1"
    assert (modeldir / "a.bin").stat().st_mtime == 1_600_000_000  # mtime kept through S3
    assert len(aws.object_gets(BUCKET, PREFIX)) == 3

    aws.requests.clear()
    assert store().modeldir("exp") == modeldir
    assert aws.object_gets(BUCKET, PREFIX) == []  # one listing, no download

    # replace one file and delete another remotely: exactly the changed one is fetched
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/exp/modeldir/a.bin", Body=b"A2")
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/exp/modeldir/b.bin")
    aws.requests.clear()
    modeldir = store().modeldir("exp")
    assert (modeldir / "a.bin").read_bytes() == b"A2"
    assert not (modeldir / "b.bin").exists()
    assert (modeldir / "sub" / "c.bin").read_bytes() == b"C1"
    assert aws.object_gets(BUCKET, PREFIX) == [f"/{BUCKET}/{PREFIX}/exp/modeldir/a.bin"]

    before = store().fingerprint("exp")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/exp/modeldir/a.bin", Body=b"A3")
    assert store().fingerprint("exp") != before


def test_studio_ml_archive_layouts(s3, aws) -> None:
    # Studio.ML: `tar -C modeldir -cf modeldir.tar .` -> members ./name
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/old/modeldir.tar",
                  Body=tar_bytes({"./": b"", "./checkpoint.03-0.45.hdf": b"W"}))
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/gz/modeldir.tgz",
                  Body=tar_bytes({"modeldir/m.h5": b"G", "modeldir/x/y.txt": b"Y"}, gzip=True))
    aws.requests.clear()
    modeldir = store().modeldir("old")
    assert sorted(p.name for p in modeldir.iterdir()) == ["checkpoint.03-0.45.hdf"]
    assert (modeldir / "checkpoint.03-0.45.hdf").stat().st_mtime == 1_600_000_000
    assert len(aws.object_gets(BUCKET, PREFIX)) == 1
    assert store().modeldir("old") == modeldir
    assert len(aws.object_gets(BUCKET, PREFIX)) == 1  # unchanged: not downloaded again

    modeldir = store().modeldir("gz")
    assert (modeldir / "m.h5").read_bytes() == b"G"
    assert (modeldir / "x" / "y.txt").read_bytes() == b"Y"

    infos = {i.key: i for i in store().experiments()}
    assert [f.name for f in infos["old"].files] == ["checkpoint.03-0.45.hdf"]  # from the cache
    # a newer archive replaces the cached files
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/old/modeldir.tar",
                  Body=tar_bytes({"./new.h5": b"N"}))
    assert [f.name for f in {i.key: i for i in store().experiments()}["old"].files] == ["modeldir.tar"]
    assert sorted(p.name for p in store().modeldir("old").iterdir()) == ["new.h5"]


@pytest.mark.parametrize(
    ("members", "links", "why"),
    [
        ({"../evil.txt": b"x"}, None, "'..'"),
        ({"./ok.h5": b"x", "./a/../../evil.txt": b"x"}, None, "'..'"),
        ({"/tmp/evil.txt": b"x"}, None, "absolute"),
        # links are refused whatever they point at (CVE-2025-4517: a chain of them escapes)
        ({}, {"ln": (tarfile.SYMTYPE, "../../../../etc/passwd")}, "symbolic link"),
        ({}, {"ln": (tarfile.SYMTYPE, "/etc/passwd")}, "symbolic link"),
        ({}, {"hard": (tarfile.LNKTYPE, "../outside")}, "hard link"),
    ],
)
def test_archive_members_that_would_escape_are_refused(s3, studio_home: Path, members, links, why) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/bad/modeldir.tar", Body=tar_bytes(members, links=links))
    with pytest.raises(StoreError, match="refusing archive") as caught:
        store().modeldir("bad")
    assert why in caught.value.message
    cache = studio_home / "cache" / "s3" / BUCKET / "team" / "a" / "experiments"
    assert not (cache / "evil.txt").exists() and not (cache / "bad" / "evil.txt").exists()
    assert not (cache / "bad" / "modeldir").exists()  # nothing half-extracted is served
    assert not Path("/tmp/evil.txt").exists() or Path("/tmp/evil.txt").read_bytes() != b"x"


def test_missing_experiment_and_empty_experiment(s3) -> None:
    with pytest.raises(ExperimentError, match="no experiment 'nope' in s3://models/team/a") as caught:
        store().modeldir("nope")
    assert "experiments push nope DIR --store s3://models/team/a" in (caught.value.hint or "")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/bare/metadata.json", Body=b"{}")
    assert list(store().modeldir("bare").iterdir()) == []  # exists, no modeldir: identity


# --- one clear line for each way AWS can say no -------------------------------------------


def test_no_bucket_is_one_line(aws) -> None:
    code, _out, err = cli("experiments", "ls", "--store", "s3://no-such-bucket/x")
    assert code == 1
    assert err.splitlines()[0] == "error: S3 bucket 'no-such-bucket' does not exist (s3://no-such-bucket/x)"
    assert "Traceback" not in err


def test_no_credentials_is_one_line(aws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, _out, err = cli("experiments", "ls", "--store", STORE)
    assert code == 1
    assert err.splitlines()[0] == f"error: no AWS credentials found for {STORE}"
    assert "AWS_ACCESS_KEY_ID" in err.splitlines()[1]


def test_access_denied_is_one_line(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client("iam")
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    # From here on moto checks IAM policies, as AWS does; "nobody" has none.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    code, _out, err = cli("experiments", "ls", "--store", STORE)
    assert code == 1
    assert err.splitlines()[0].startswith(f"error: access denied to {STORE} (ListObjectsV2: AccessDenied)")


def test_progress_bar_for_large_transfers(s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_files(tmp_path / "big", {"big.h5": os.urandom(5 * 1024 * 1024), "small.h5": b"s"})
    code, _out, err = cli("experiments", "push", "big", str(source), "--store", STORE)
    assert code == 0, err
    assert "uploading big.h5" in err and "100%" in err and "5.2 MB / 5.2 MB" in err
    assert "small.h5" not in err  # small files show no bar

    modeldir = store().modeldir("big")
    err = capsys.readouterr().err
    assert "downloading big.h5" in err and "5.2 MB / 5.2 MB" in err and "small.h5" not in err
    assert (modeldir / "big.h5").read_bytes() == (source / "big.h5").read_bytes()


# --- end to end: a real Keras checkpoint served from s3:// -----------------------------------


def save_dense(path: Path, bias: float) -> None:
    """A Dense(1) layer: y = x . [1, 2, 3] + bias."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.layers[0].set_weights([np.array([[1.0], [2.0], [3.0]], np.float32), np.array([bias], np.float32)])
    model.save(path)


def answer(url: str) -> float:
    result = predict(url, {"x": np.array([[1.0, 1.0, 1.0]], np.float32)})
    return float(np.asarray(result["x"]).ravel()[0])


@pytest.mark.timeout(240)
def test_keras_checkpoint_served_from_s3_and_refreshed(s3, aws, tmp_path: Path) -> None:
    if "keras" not in make_host().loaders():
        pytest.skip("needs the keras loader (issue 3)")
    # v1 in Studio.ML's remote layout: modeldir.tar with ./ members
    save_dense(tmp_path / "model.h5", bias=0.5)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tmp_path / "model.h5", arcname="./checkpoint.01-0.50.h5")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/mnist/modeldir.tar", Body=buffer.getvalue())
    with ServerProcess("mnist", "--store", STORE, "--killafter", "0") as server:
        assert answer(server.url) == pytest.approx(6.5)

    # v2 pushed as loose files (newer upload): the next serve fetches it
    time.sleep(1.1)
    save_dense(write_files(tmp_path / "v2", {}) / "checkpoint.02-0.20.keras", bias=10.0)
    code, _out, err = cli("experiments", "push", "mnist", str(tmp_path / "v2"), "--store", STORE)
    assert code == 0, err
    aws.requests.clear()
    with ServerProcess("mnist", env={"STUDIO_STORE": STORE}) as server:
        assert answer(server.url) == pytest.approx(16.0)
    assert len(aws.object_gets(BUCKET, PREFIX)) == 1

    # unchanged: served from the cache, nothing downloaded
    aws.requests.clear()
    with ServerProcess("mnist", "--store", STORE) as server:
        assert answer(server.url) == pytest.approx(16.0)
    assert aws.object_gets(BUCKET, PREFIX) == []
