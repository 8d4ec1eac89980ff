"""``serve --cloud ec2`` ships what runs here: a wheel of the running ``studio-plugins`` in the
store, which the user data installs and serves (tried here in a fresh venv against moto's S3 and
SSM: HTTPS with the certificate the CLI signed, verified with the user's CA); and ``ls`` says
which servers answer yet."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

import studio_plugins
from plugins.backends.ec2.inventory import Server
from plugins.backends.ec2.userdata import BOOT, VENV
from studio_plugins import __version__
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess
from studio_plugins.tls import user_ca_file
from tests.plugins.test_ec2_backend import (
    BUCKET,
    WEIGHTS,
    WRAPPER,
    cli,
    cloud,  # noqa: F401  (the fixture)
    launch,
    launched,
    loopback_instances,  # noqa: F401  (the fixture: the certificate names 127.0.0.1)
    run_user_data_locally,
    user_data,
)

PREFIX = "prod/wheels/"
END_CERT = "-----END CERTIFICATE-----\n"


def stored_wheels() -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def wrapper_file(tmp_path: Path) -> str:
    path = tmp_path / "matmul_wrapper.py"
    path.write_text(WRAPPER)
    return str(path)


def check_is_the_running_version(key: str, data: bytes) -> None:
    """A valid wheel of ``studio-plugins`` at the running version, stored under its own sha256,
    whose every module is byte for byte the one running here."""
    digest, filename = key.removeprefix(PREFIX).split("/")
    assert hashlib.sha256(data).hexdigest() == digest
    assert filename == f"studio_plugins-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        assert wheel.testzip() is None
        metadata = wheel.read(f"studio_plugins-{__version__}.dist-info/METADATA").decode()
        assert "Name: studio-plugins\n" in metadata and f"Version: {__version__}\n" in metadata
        entry_points = wheel.read(f"studio_plugins-{__version__}.dist-info/entry_points.txt")
        assert b"studio-plug = studio_plugins.cli:main" in entry_points
        root = Path(studio_plugins.__file__).resolve().parents[1]
        modules = [n for n in wheel.namelist() if n.endswith(".py")]
        assert {"studio_plugins/__init__.py", "core/version.py", "plugins/backends/ec2/wheels.py",
                "plugins/backends/ec2/userdata.py"} <= set(modules)
        for name in modules:
            assert wheel.read(name) == (root / name).read_bytes(), name
        assert not [n for n in wheel.namelist() if n.startswith(("tests/", ".venv/", "build/"))]


def fresh_venv(workdir: Path) -> Path:
    """A new venv under ``workdir`` with nothing of ours in it. The packages of this interpreter
    stand in for the index (``PIP_NO_INDEX``): they are on the new venv's path behind its own
    site-packages, where the wheel goes."""
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=60)
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    outer = [p for p in sys.path if p.endswith("site-packages")]
    Path(purelib, "outer-site.pth").write_text("\n".join(outer) + "\n")
    return venv


def boot_as_the_instance(script: str, workdir: Path) -> tuple[Path, list[str], dict[str, str]]:
    """Run the user data's lines in their order as the instance does, each with the python of a
    fresh venv (its ``PATH``) and this checkout nowhere on the path: fetch the wheels and the
    wrapper from moto's S3, ``pip install`` them, then read the token and the key and certificate
    from moto's SSM with the installed wheel's ``boot``. The instance's paths (under its venv)
    are the same paths under ``workdir``. Returns the venv and the serve arguments and
    environment (``run_user_data_locally``'s, with the token read here)."""
    venv = fresh_venv(workdir)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def here(arg: str) -> str:
        return str(workdir / Path(arg).relative_to(VENV)) if arg.startswith(VENV) else arg

    def run(argv: list[str]) -> str:
        done = subprocess.run([python, *map(here, argv)], env=env, cwd=workdir,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    token, rest, installed = None, [], False
    for line in script.splitlines():
        if line.startswith("mkdir -p "):
            for folder in shlex.split(line)[2:]:
                Path(here(folder)).mkdir(parents=True, exist_ok=True)
        elif line.startswith("pip install ") and "--upgrade pip" not in line:
            # the dependencies come from the outer site-packages, which may also hold this
            # project installed editable (tox): pip would call the wheel "already satisfied"
            # and install nothing, so the wheels are forced in, each alone (no dependencies)
            forced = ["--force-reinstall", "--no-deps"] if ".whl" in line else []
            run(["-m", *shlex.split(line), *forced])
            installed = True
        elif line.startswith("python "):  # a fetch from S3, or boot's key and certificate
            assert installed or " -c " in line, line  # boot comes from the installed wheel
            run(shlex.split(line)[1:])
        elif line.startswith('STUDIO_TOKEN="$(') and line.endswith(')"'):  # boot's token
            assert installed, line
            token = run(shlex.split(line.removeprefix('STUDIO_TOKEN="$(').removesuffix(')"'))[1:])
        else:
            rest.append(line)
    assert token, script
    argv, serve_env = run_user_data_locally("\n".join(rest), workdir)  # exports, serve line
    return venv, argv, {**serve_env, "STUDIO_TOKEN": token}


class VenvServer(ServerProcess):
    """``studio-plug serve`` as the instance runs it: the venv's console script, no PYTHONPATH."""

    def __init__(self, venv: Path, *args: str, env: dict[str, str]) -> None:
        super().__init__(*args, env=env)
        self.env.pop("PYTHONPATH", None)
        self.venv = venv

    @property
    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "studio-plug"), "serve", *self.args]


def ls_rows() -> dict[str, list[str]]:
    code, out, err = cli("ls")
    assert code == 0, err
    header, *rows = out.split("\n\n")[0].splitlines()
    assert header.split()[:8] == ["INSTANCE", "KEY", "ADDRESS", "PORT", "TYPE", "STATE", "SERVER",
                                  "AGE"]
    return {row.split()[0]: row.split()[1:8] for row in rows}


@pytest.mark.timeout(120)
def test_the_instance_installs_the_wheel_of_what_runs_here_and_serves(
    cloud, loopback_instances, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    import boto3

    code, out, err = launch("--wrapper", wrapper_file(tmp_path))
    assert code == 0, err
    url, instance_id, token = launched(out)
    assert f"booting: {url} does not answer" in err  # no --wait-ready: said plainly
    (key, data), = stored_wheels().items()
    check_is_the_running_version(key, data)
    assert f"uploaded {Path(key).name} to s3://{BUCKET}/{key}" in err

    script = user_data(cloud, instance_id)
    wheel_path = f"{VENV}/wheels/{Path(key).name}"
    assert shlex.join(["python", "-c"]) in script and f"{BUCKET} {key} {wheel_path}" in script
    assert f"pip install -q '{wheel_path}[all]'" in script
    assert "studio-plugins[all]==" not in script  # not the index, which does not have it

    # moto's address is no machine: point this instance's at a port here, where first nothing
    # listens (an instance still installing), then its server, run as the instance would
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        target = [f"http://127.0.0.1:{unused.getsockname()[1]}/"]
    real_url = Server.url.fget  # type: ignore[attr-defined]
    monkeypatch.setattr(Server, "url", property(
        lambda s: target[0] if s.instance_id == instance_id else real_url(s)))
    assert ls_rows()[instance_id][5] == "booting"

    workdir = tmp_path / "instance"
    venv, argv, env = boot_as_the_instance(script, workdir)
    assert (workdir / "wheels" / Path(key).name).read_bytes() == data
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import studio_plugins, plugins.backends.ec2.boot as boot; "
         "print(studio_plugins.__file__, boot.__file__)"],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=workdir,
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert all(Path(w).is_relative_to(venv) for w in where), where  # the wheel's, not this checkout's
    assert env["STUDIO_TOKEN"] == token  # read from moto's SSM by the wheel's boot
    (tls_name,) = [line.split()[4] for line in script.splitlines() if line.startswith(BOOT + " tls ")]
    signed = json.loads(boto3.client("ssm").get_parameter(
        Name=tls_name, WithDecryption=True)["Parameter"]["Value"])["cert.pem"]
    assert (workdir / "tls" / "cert.pem").read_text() == signed
    assert (workdir / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    with VenvServer(venv, *argv, env=env) as server:
        assert server.url.startswith("https://127.0.0.1:"), server.url
        served = ssl.get_server_certificate(("127.0.0.1", urlsplit(server.url).port or 0))
        leaf = signed.split(END_CERT)[0] + END_CERT
        assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(leaf)  # the CLI's
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(server.url + "v2/health/ready", timeout=10,
                                   context=ssl.create_default_context())  # only the user's CA
        x = np.array([[1.0, 1.0, 1.0]], np.float32)
        for cafile in (str(user_ca_file()), None):  # given, and found by the client itself
            reply = predict(server.url, {"x": x}, token=token, cafile=cafile)
            np.testing.assert_allclose(reply["x"], x @ WEIGHTS)
        target[0] = server.url
        assert ls_rows()[instance_id][5] == "ready"


def test_a_relaunch_reuses_the_stored_wheel_and_a_failed_launch_deletes_only_its_own(
    cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    from moto import settings

    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", True)
    code, _out, err = launch("--key-name", "no-such-key")  # fails after the upload
    assert code == 1 and "InvalidKeyPair.NotFound" in err
    assert f"cleaning up: deleting s3://{BUCKET}/{PREFIX}" in err
    assert stored_wheels() == {}

    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", False)
    assert launch()[0] == 0
    stored = stored_wheels()
    assert len(stored) == 1
    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", True)
    code, _out, err = launch("--key-name", "no-such-key")
    assert code == 1 and "is in the store already" in err
    assert "cleaning up: deleting s3://" not in err  # another launch's wheel stays
    assert stored_wheels() == stored


def test_install_spec_overrides_the_shipped_wheel(cloud) -> None:  # noqa: F811
    code, out, err = launch("--install", "studio-plugins[all] @ https://example.com/sp.whl")
    assert code == 0, err
    script = user_data(cloud, launched(out)[1])
    assert "pip install -q 'studio-plugins[all] @ https://example.com/sp.whl'" in script
    assert "/wheels/" not in script and "pip install -q boto3" not in script
    assert stored_wheels() == {}


def test_ls_answers_within_seconds_when_a_server_never_replies(
    cloud, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    code, out, err = launch("--install", "studio-plugins")
    assert code == 0, err
    instance_id = launched(out)[1]
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        monkeypatch.setattr(Server, "url", property(lambda s: f"http://127.0.0.1:{port}/"))
        started = time.monotonic()
        assert ls_rows()[instance_id][5] == "booting"
        assert time.monotonic() - started < 8.0


def installed_plugin(site: Path, name: str, version: str, direct_url: str | None,
                     entry_point: bool = True) -> None:
    """Distribution ``name`` installed into ``site`` as pip leaves one: its module (the example
    plugin of docs/plugins.md), a dist-info with the entry point, a RECORD, and with
    ``direct_url`` (a local path install) a ``direct_url.json``."""
    from tests.plugins.test_third_party import example_plugin_source

    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(example_plugin_source())
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[studio_plugins]\n{module} = {module}\n" if entry_point
                                           else "")
    files = [f"{module}.py", f"{info.name}/METADATA", f"{info.name}/entry_points.txt"]
    if direct_url:
        (info / "direct_url.json").write_text(f'{{"url": "{direct_url}", "archive_info": {{}}}}')
        files.append(f"{info.name}/direct_url.json")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, f"{info.name}/RECORD"]))


def test_plugin_distributions_from_a_local_path_travel_as_wheels_and_from_an_index_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.backends.ec2.userdata import UserData, WrapperFetch
    from plugins.backends.ec2.wheels import build_shipment

    site = tmp_path / "plugins-site"
    site.mkdir()
    installed_plugin(site, "studio-acme", "1.2.3", f"file://{tmp_path}/studio_acme-1.2.3.tar.gz")
    installed_plugin(site, "studio-indexed", "0.5", None)
    installed_plugin(site, "wrapmod", "2.0", f"file://{tmp_path}/wrapmod", entry_point=False)
    monkeypatch.syspath_prepend(str(site))

    # wrapmod provides no plugin: it travels only when a wrapper is named as its module
    assert [w.distribution for w in build_shipment(["wrapmod.sub"]).wheels] == [
        "studio-plugins", "studio-acme", "wrapmod"]
    shipment = build_shipment(["matmul_wrapper", "some-registered-name"])
    ours, acme = shipment.wheels
    assert ours.path.name == f"studio_plugins-{__version__}-py3-none-any.whl"
    assert (acme.distribution, acme.path.name) == ("studio-acme", "studio_acme-1.2.3-py3-none-any.whl")
    assert acme.sha256 == hashlib.sha256(acme.path.read_bytes()).hexdigest()
    assert shipment.requirements == ("studio-indexed==0.5",)
    with zipfile.ZipFile(acme.path) as wheel:
        assert wheel.read("studio_acme.py") == (site / "studio_acme.py").read_bytes()
        assert "studio_acme-1.2.3.dist-info/direct_url.json" not in wheel.namelist()

    # pip installs it (RECORD checked), and the entry point is there for the instance's host
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(acme.path)], check=True, timeout=60)
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, sys; sys.path.insert(0, sys.argv[1]); "
         "print([e.value for e in m.entry_points(group='studio_plugins')])", str(target)],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert "studio_acme" in found

    script = UserData(["studio-plug", "serve", "x"], wheels=(
        WrapperFetch("b", "k1", f"{VENV}/wheels/{ours.path.name}"),
        WrapperFetch("b", "k2", f"{VENV}/wheels/{acme.path.name}"),
    ), requirements=shipment.requirements).render()
    assert (f"pip install -q '{VENV}/wheels/{ours.path.name}[all]' "
            f"{VENV}/wheels/{acme.path.name} studio-indexed==0.5") in script
