"""The serve options are declared once (core/options.py): the click options of ``serve`` and the
command line sent to an instance or worker both come from ``ServeOptions``' fields, and that
command line parses back to the same options, field by field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from click.testing import CliRunner

from core.options import OPTION, serve_argv, serve_environment
from core.process.launch import Launch
from core.types import ModelSpec, ServeOptions
from studio_plugins.cli import build_cli, parse_serve_argv
from studio_plugins.testing import make_host

BASE = ServeOptions(keys=("exp",))

# A value other than the default for every field; a field missing here fails its test below,
# so a new option cannot skip the round trip.
SAMPLES: dict[str, dict[str, Any]] = {
    "keys": {"keys": ("a", "b-2")},
    "port": {"port": 8080},
    "grpc_port": {"grpc_port": 0},  # 0 (any free port) is not the default (off)
    "host": {"host": "0.0.0.0"},
    "certfile": {"certfile": "/etc/studio/server.pem"},
    "keyfile": {"keyfile": "/etc/studio/server key.pem"},
    "ca_certs": {"ca_certs": "clients-ca.pem"},
    "killafter": {"killafter": 0.1 + 0.2},  # not exact in %g: written in full
    "store_url": {"store_url": "s3://bucket/prefix"},
    "token": {"token": "s3cret token"},
    "cors": {"cors": ("http://a.example", "*")},
    "wrapper": {"wrapper": "wrappers/common.py"},
    "wrappers": {"models": (ModelSpec("own", "exp"),), "wrappers": {"own": "own=wrapper.py"}},
    "models": {"models": (ModelSpec("m1", "exp"), ModelSpec("m2", "other", "ckpt.01.keras"))},
    "allow_partial": {"allow_partial": True},
    "watch": {"watch": 2.5},
    "checkpoint": {"checkpoint": "checkpoint.01-0.90.hdf"},
    "loader": {"loader": "identity"},
    "trust_checkpoint": {"trust_checkpoint": True},
    "gpus": {"gpus": 2},
    "max_body": {"max_body": 3 * 1024 * 1024 + 1},
    "read_timeout": {"read_timeout": 0.0},
    "min_rate": {"min_rate": 0},
    "body_budget": {"body_budget": 2 << 30},
    "threads": {"threads": 9},
    "timeout": {"timeout": 1.25},
    "max_queue": {"max_queue": 0},
    "max_batch_size": {"max_batch_size": 8},
    "max_batch_delay": {"max_batch_delay": 0.5},
    "compile": {"compile": False},
    "workers": {"workers": 3},
    "threads_per_worker": {"threads_per_worker": 2},
    "metrics": {"metrics": False},
    "access_log": {"access_log": True},
    "debug": {"debug": True},
}
STAYS_HERE = {"backend_options"}
"""Read by the backend that launches; what it sends serves where it lands."""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("STUDIO_STORE", "STUDIO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def round_trip(options: ServeOptions, monkeypatch: pytest.MonkeyPatch) -> ServeOptions:
    for name, value in serve_environment(options).items():
        monkeypatch.setenv(name, value)  # as the instance's environment carries them
    return parse_serve_argv(make_host(), serve_argv(options))


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ServeOptions)])
def test_every_option_survives_the_command_line(name: str, clean_env: pytest.MonkeyPatch) -> None:
    if name in STAYS_HERE:
        assert OPTION not in ServeOptions.__dataclass_fields__[name].metadata
        return
    assert name in SAMPLES, f"give {name} a non-default sample: its round trip is untested"
    options = dataclasses.replace(BASE, **SAMPLES[name])
    assert getattr(options, name) != getattr(BASE, name)
    assert round_trip(options, clean_env) == options


def test_all_options_at_once_and_the_defaults(clean_env: pytest.MonkeyPatch) -> None:
    everything: dict[str, Any] = {}
    for sample in SAMPLES.values():
        everything.update(sample)
    everything["models"] = (*SAMPLES["models"]["models"], *SAMPLES["wrappers"]["models"])
    options = dataclasses.replace(BASE, **everything)
    assert round_trip(options, clean_env) == options
    clean_env.delenv("STUDIO_TOKEN")
    assert round_trip(BASE, clean_env) == BASE
    plain = serve_argv(BASE)
    # the defaults an instance must not take from another version are spelled out; others not
    for flag in ("--host", "--port", "--killafter", "--max-body", "--threads", "--max-queue",
                 "--max-batch-size", "--max-batch-delay"):
        assert flag in plain
    assert "--read-timeout" not in plain and "--workers" not in plain


def test_secrets_and_backend_options_stay_off_the_command_line() -> None:
    options = ServeOptions(keys=("exp",), token="s3cret", backend_options={"region": "eu-west-1"})
    argv = Launch(make_host(), options).serve_argv()
    assert "s3cret" not in argv and "--token" not in argv and "eu-west-1" not in argv
    assert serve_environment(options) == {"STUDIO_TOKEN": "s3cret"}
    assert "--cloud" not in argv  # the sent command serves where it lands


def test_a_backend_changes_options_not_argv() -> None:
    launch = Launch(make_host(), ServeOptions(keys=("exp",), killafter=600.0))
    argv = launch.serve_argv(dataclasses.replace(launch.options, host="0.0.0.0", killafter=0.0))
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--killafter") + 1] == "0"
    assert argv.count("--killafter") == 1


def test_the_help_lists_every_declared_option() -> None:
    text = CliRunner().invoke(build_cli(make_host()), ["serve", "--help"]).output
    for f in dataclasses.fields(ServeOptions):
        spec = f.metadata.get(OPTION)
        if spec and spec.flag:
            assert spec.flag in text
    assert "[default: 64MiB]" in text and "[default: 3600; x>=0]" in text
    assert "--metrics / --no-metrics" in text and "--instance-type" in text  # a backend's own


@pytest.mark.parametrize(("cores", "workers", "threads"),
                         [(2, 1, 1), (16, 1, 15), (1, 1, 1), (16, 4, 4), (2, 2, 1), (3, 8, 1)])
def test_intra_op_threads_leave_one_process_a_core_for_its_event_loop(
        monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, threads: int) -> None:
    from core.process import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: cores)
    assert launch.default_threads(workers) == threads
