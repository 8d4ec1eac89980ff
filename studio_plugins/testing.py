"""Helpers for testing studio-plug and plugins for it, in their own test suites.

``make_host(my_plugin)`` gives a fresh PluginHost with the built-ins plus your plugin (and no
installed entry points, so the test sees only what it asked for). ``ServerProcess`` runs the
real ``studio-plug serve`` in a subprocess on 127.0.0.1 and knows its URL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType

from core.host import BUILTIN_PLUGINS, PluginHost

_READY = re.compile(r"^Serving .* on (https?://\S+)$")
_GRPC = re.compile(r"^  V2 over gRPC on (\S+)")


def make_host(
    *plugins: object, builtins: Iterable[str] = BUILTIN_PLUGINS, entry_points: bool = False,
    disable: Iterable[str] = (),
) -> PluginHost:
    """A fresh host with the built-ins and ``plugins`` registered last."""
    return PluginHost(
        builtins=tuple(builtins), entry_points=entry_points, plugins=plugins, disable=disable
    )


class ServerProcess:
    """``studio-plug serve ARGS --port 0 --host 127.0.0.1`` in a subprocess.

    Use as a context manager; ``url`` is set once the server printed its ready line. Output is
    collected in ``stdout_lines`` / ``stderr_lines`` (also shown by ``output()``).
    """

    def __init__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
        port: int | None = 0,
        host: str | None = "127.0.0.1",
    ) -> None:
        self.args = list(args)
        if port is not None and "--port" not in self.args:
            self.args += ["--port", str(port)]
        if host is not None and "--host" not in self.args:
            self.args += ["--host", host]
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.startup_timeout = startup_timeout
        self.url: str = ""
        self.grpc_target: str = ""
        """``host:port`` of the gRPC listener (``--grpc-port``), as ``tritonclient.grpc`` takes it."""
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "studio_plugins", "serve", *self.args]

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env,
        )
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready.wait(0.05):
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the pumps drain
                raise RuntimeError(
                    f"server exited with {self.process.returncode} before it was ready:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"server not ready in {self.startup_timeout}s:\n" + self.output()
                )
        return self

    def _pump_stdout(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.stdout_lines.append(line)
            grpc = _GRPC.match(line)  # printed before the ready line
            if grpc and not self.grpc_target:
                self.grpc_target = grpc.group(1)
            match = _READY.match(line)
            if match and not self.url:
                self.url = match.group(1)
                self._ready.set()

    def _pump_stderr(self) -> None:
        assert self.process and self.process.stderr
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout_lines, "--- stderr", *self.stderr_lines])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL if it did not exit."""
        if not self.process:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
