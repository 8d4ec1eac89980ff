"""Does a model loaded by a loader still run in a forked child with several torch threads?

Worker processes fork after the model is loaded. Once torch has run a multi-threaded op in a
process, a forked child that runs torch with more than one thread hangs (OpenMP's pool is not
fork-safe), so loaders must load and prime single-threaded. Checked in a fresh interpreter:
the test process itself has long run torch on many threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys, time, signal
from pathlib import Path
import numpy as np
import torch
from studio_plugins import LoadOptions
from studio_plugins.testing import make_host

loader, checkpoint, shape = sys.argv[1], Path(sys.argv[2]), eval(sys.argv[3])
dirty, patience = sys.argv[4] == "1", float(sys.argv[5])
model = make_host().loaders()[loader].load(checkpoint, LoadOptions())
if dirty:  # what a loader must not do: run a multi-threaded op before the fork
    torch.ones(1000, 1000) @ torch.ones(1000, 1000)
pid = os.fork()
if pid == 0:
    torch.set_num_threads(2)
    torch.ones(1000, 1000) @ torch.ones(1000, 1000)
    model.predict({"k": np.ones(shape, np.float32)})
    os._exit(0)
deadline = time.monotonic() + patience
while time.monotonic() < deadline:
    if os.waitpid(pid, os.WNOHANG)[0]:
        print("child finished")
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)
    print("child hung")
"""


def forked_child(
    loader: str, checkpoint: Path, shape: tuple[int, ...], *, dirty: bool = False, patience: float = 20
) -> str:
    """``child finished``, or ``child hung`` when it did not within ``patience`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, loader, str(checkpoint), repr(shape), "1" if dirty else "0",
         str(patience)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]
