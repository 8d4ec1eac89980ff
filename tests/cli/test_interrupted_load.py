"""Ctrl-C (SIGINT) or SIGTERM while `serve` loads its model: exit 0 at once, without click's
"Aborted!" and without waiting for the load (a real server subprocess, a real slow load)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from studio_plugins.testing import ServerProcess

SLOW = str(Path(__file__).parent / "data" / "slow_wrapper.py")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGINT, "1"), (signal.SIGTERM, "1"), (signal.SIGINT, "2")],
)
def test_a_signal_during_the_load_exits_0_at_once(
    modeldir: Path, tmp_path: Path, signum: int, workers: str
) -> None:
    server = ServerProcess("exp", "--wrapper", SLOW, "--workers", workers,
                           env={"TMPDIR": str(tmp_path)})
    process = subprocess.Popen(server.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=server.env)
    lines: list[str] = []
    loading = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if "slow_wrapper: loading" in line:
                loading.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert loading.wait(30), "\n".join(lines)
        signalled = time.monotonic()
        process.send_signal(signum)
        status = process.wait(timeout=10)
        took = time.monotonic() - signalled
    finally:
        process.kill()
        process.wait()
    reader.join(5)
    output = "\n".join(lines) + (process.stdout.read() if process.stdout else "")
    assert status == 0, output
    assert took < 2.0, (took, output)  # the load had 60 s to go
    assert "Aborted!" not in output and "Traceback" not in output
    name = signal.Signals(signum).name
    assert any(line.endswith(f"{name} received while loading models; exiting") for line in lines)
    assert not list(tmp_path.glob("studio-metrics-*"))  # --workers' metrics folder is removed
