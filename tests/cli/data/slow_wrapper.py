"""A model whose load takes a minute (a stand-in for a large checkpoint or a slow framework
import): says on stderr when the load has begun, so a test can interrupt it then."""

import sys
import time


def create_model(modeldir):
    print("slow_wrapper: loading", file=sys.stderr, flush=True)
    time.sleep(60)
    return lambda data: data
