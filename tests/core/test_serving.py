"""Binding and process set-up for serving (no server started here)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from core.errors import ConfigurationError
from core.process.serving import socket_url
from core.process.sockets import bind_socket


def test_port_zero_picks_a_free_port_and_the_url_says_which() -> None:
    with bind_socket("localhost", 0) as sock:
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
        assert socket_url(sock) == f"http://127.0.0.1:{port}/"


def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigurationError, match="already in use"):
            bind_socket("127.0.0.1", taken.getsockname()[1])


def test_an_unknown_host_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"cannot resolve|not an address"):
        bind_socket("no-such-host.invalid", 0)


def tune_in_subprocess(env: dict[str, str]) -> str:
    program = "from core.process.serving import tune_malloc; print(tune_malloc())"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, check=True, timeout=60).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_tuning_applies_unless_the_user_set_the_thresholds() -> None:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert tune_in_subprocess(base) == "True"
    assert tune_in_subprocess({**base, "MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"
