"""A model whose forked workers can be made to die: at once after the fork (``DYING_AT_FORK=1``:
a worker that never gets going, while the parent that loaded it lives), or on a request holding
``die``. Each worker appends ``<monotonic time> <pid>`` to ``$DYING_LOG`` when forked."""

import os
import time

import numpy as np


def create_model(modeldir):
    log = os.environ.get("DYING_LOG")
    at_fork = os.environ.get("DYING_AT_FORK") == "1"

    def in_worker():
        if log:
            with open(log, "a") as handle:
                handle.write(f"{time.monotonic()} {os.getpid()}\n")
        if at_fork:
            os._exit(3)

    os.register_at_fork(after_in_child=in_worker)

    def model(data):
        if "die" in data:
            os._exit(4)
        return {"pid": np.array([os.getpid()])}

    return model
