"""Each fuzz target under atheris for a few seconds from its seeds: no crash, no hang (an input
over ``-timeout`` seconds), no runaway memory (``-rss_limit_mb``). The long run is in
fuzz/README.md."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import ROOT, targets

pytest.importorskip("atheris")

SECONDS = 4
RSS_LIMIT_MB = 2048
"""Memory a fuzz run may grow by before libFuzzer calls it an out-of-memory finding."""


def rss_limit_mb() -> int:
    """``RSS_LIMIT_MB`` above this process's own peak. libFuzzer checks its peak RSS
    (``ru_maxrss``), and Linux carries a parent's peak across fork and exec into the child: a
    pytest process that had grown to 2.2 GB by the end of the suite made every target an
    "out-of-memory" at its first input (the fresh-clone CI's failure)."""
    return RSS_LIMIT_MB + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", targets())
def test_a_short_run_finds_nothing(target: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "fuzz", target, f"-max_total_time={SECONDS}", f"-rss_limit_mb={rss_limit_mb()}",
        "-timeout=5", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    findings = [path.name for path in tmp_path.iterdir() if path.is_file()]
    assert done.returncode == 0 and not findings, (
        f"{target}: exit {done.returncode}, findings {findings}\n{done.stderr[-4000:]}"
    )
    assert "Done " in done.stderr  # it ran: libFuzzer's last line counts the runs
