"""Fuzz target: the pickle decoder (core/wire/pickle_decoder.py behind ``restricted_loads``).

Any body must be decoded or refused with a client error (400/413), never crash, hang or raise
anything else; and whatever is decoded must then survive what the server does with a payload:
copy and concatenate its arrays (batching), turn them to lists (JSON replies), and pickle the
value as a reply that the same decoder reads back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.wire import pickle_decoder
from core.wire.safe_pickle import dumps, restricted_loads
from fuzz import CLIENT_ERRORS
from fuzz.instrument import loaded

loaded(
    "core.wire.fast_pickle", "core.wire.pickle_dtypes", "core.wire.pickle_decoder", "core.wire.pickle_values",
    "core.wire.pickle_finish", "core.wire.safe_pickle"
)

LIMIT = 1 << 22  # 4 MiB: large enough for every seed, small enough to find amplification fast


def _use(value: Any, depth: int = 0) -> None:
    if isinstance(value, np.ndarray):
        value.copy()
        np.concatenate([value.reshape(-1), value.reshape(-1)])
        value.tolist()
    elif isinstance(value, np.generic):
        value.item()
    elif isinstance(value, dict):
        for item in value.values():
            _use(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _use(item, depth + 1)


def one_input(data: bytes) -> None:
    pickle_decoder.STRICT = True  # an error the decoder's checks should have caught is a finding
    try:
        value = restricted_loads(data, LIMIT)
    except CLIENT_ERRORS:
        return
    finally:
        pickle_decoder.STRICT = False
    _use(value)
    again = restricted_loads(dumps(value), 2 * LIMIT)  # our replies must be readable by our client
    assert type(again) is type(value)
