"""Decoding and encoding a request's pickle in one process: what the server does against the alternatives.

For each body (a dict of one array, and a mixed dict of 10 keys, as ``pickle.dumps`` writes them
at protocols 2, 4 and 5), side by side in one run: ``restricted_loads`` (what the server does:
core/wire/fast_pickle.py, else the data-only decoder), the data-only decoder alone
(core/wire/pickle_decoder.py), the restricted unpickler it replaced (bench/legacy_unpickler.py, the
baseline of issue 13's "at most 2x") and plain ``pickle.loads`` (unsafe: the floor); for replies,
``dumps`` (what the server does) against ``pickle.dumps``, and the JSON codec's strict encoding
(NaN and infinities as ``null``) against Python's ``json.dumps`` as it was called before (which
writes ``NaN``), with one NaN last in an array for the re-encoding it costs (JSON: a tenth of the
calls). Microseconds per call, the best of ``--repeat`` timings of ``--number`` calls each. With
``--callgrind``, the mixed dict's decode by the data-only decoder and by the legacy unpickler in
instructions (valgrind; each counted at two call counts in a fresh process and the difference
divided): the same figure however busy the machine.

    python -m bench.bench_codec
    python -m bench.bench_codec --callgrind      # ~2 min
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bench.harness import callgrind_instructions, describe_machine, print_table, quiet_env
from bench.legacy_unpickler import unpickle_restricted
from core.wire.safe_pickle import decode_general, dumps, restricted_loads
from plugins.codecs.json import JsonCodec, _default


def micros(call: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_codec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure (the best is shown)")
    parser.add_argument("--callgrind", action="store_true",
                        help="instructions per decode of the mixed dict: decoder against legacy unpickler")
    parser.add_argument("--one", nargs=3, metavar=("DECODER", "PROTOCOL", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        decode_mixed(args.one[0], int(args.one[1]), int(args.one[2]))
        return 0
    if args.callgrind:
        return count_mixed()
    rng = np.random.default_rng(0)
    payloads: dict[str, dict[str, Any]] = {
        "10 float64": {"x": rng.random(10)},
        "1x784 float32": {"x": rng.random((1, 784), dtype=np.float32)},
        "1x64x64x3 uint8": {"x": rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)},
        "mixed, 10 keys": mixed_payload(rng),
    }
    print(f"# bench_codec: {describe_machine()}; best of {args.repeat} x {args.number} calls, us per call")
    rows = []
    for name, payload in payloads.items():
        for protocol in (2, 4, 5) if name.startswith("mixed") else (4, 5):
            body = pickle.dumps(payload, protocol=protocol)
            served = micros(partial(restricted_loads, body), args.number, args.repeat)
            decoder = micros(partial(decode_general, body), args.number, args.repeat)
            legacy = micros(partial(unpickle_restricted, body), args.number, args.repeat)
            plain = micros(partial(pickle.loads, body), args.number, args.repeat)
            rows.append([f"decode {name}, protocol {protocol}", served, decoder, legacy, plain,
                         f"{decoder / legacy:.2f}x"])
        ours = micros(partial(dumps, payload), args.number, args.repeat)
        theirs = micros(partial(pickle.dumps, payload, protocol=5), args.number, args.repeat)
        rows.append([f"encode {name}", ours, "-", "-", theirs, f"{ours / theirs:.2f}x"])
    with_nan = rng.random((1, 784), dtype=np.float32)
    with_nan[0, -1] = np.nan
    json_payloads = {name: payloads[name] for name in ("10 float64", "1x784 float32", "1x64x64x3 uint8")}
    json_payloads["1x784 float32, a NaN last"] = {"x": with_nan}
    codec = JsonCodec()
    for name, payload in json_payloads.items():
        ours = micros(partial(codec.encode, payload), args.number // 10, args.repeat)
        before = micros(partial(json_dumps_before, payload), args.number // 10, args.repeat)
        rows.append([f"encode {name}, JSON", ours, "-", "-", before, f"{ours / before:.2f}x"])
    print_table(rows, ["body", "served us", "decoder us", "legacy unpickler us", "plain pickle us",
                       "ratio"])
    print("\nserved: restricted_loads / dumps / the JSON codec as the server runs them; ratio: the "
          "data-only decoder against the legacy restricted unpickler (decode), our dumps against "
          "pickle.dumps (encode), the JSON codec against json.dumps as called before (JSON: in the "
          "plain pickle column)")
    return 0


def json_dumps_before(payload: dict[str, Any]) -> bytes:
    """The JSON codec's encode before replies were strict: NaN written as ``NaN``."""
    return json.dumps(payload, default=_default, allow_nan=True).encode()


DECODERS: dict[str, Callable[[bytes], Any]] = {"decoder": decode_general, "legacy": unpickle_restricted}


def decode_mixed(decoder: str, protocol: int, calls: int) -> None:
    """Child process: decode the mixed dict ``calls`` times."""
    body = pickle.dumps(mixed_payload(np.random.default_rng(0)), protocol=protocol)
    decode = DECODERS[decoder]
    for _ in range(calls):
        decode(body)


def count_mixed(few: int = 200, many: int = 1200) -> int:
    print(f"# bench_codec --callgrind: {describe_machine()}; instructions per decode of the mixed dict")
    rows = []
    for protocol in (2, 4, 5):
        per_call = {}
        for decoder in DECODERS:
            counts = [callgrind_instructions(
                [sys.executable, __file__, "--one", decoder, str(protocol), str(calls)], quiet_env())
                for calls in (few, many)]
            per_call[decoder] = (counts[1] - counts[0]) / (many - few)
        rows.append([f"mixed, 10 keys, protocol {protocol}", f"{per_call['decoder']:,.0f}",
                     f"{per_call['legacy']:,.0f}", f"{per_call['decoder'] / per_call['legacy']:.2f}x"])
    print_table(rows, ["body", "decoder", "legacy unpickler", "ratio"])
    return 0


def mixed_payload(rng: np.random.Generator) -> dict[str, Any]:
    """What a client may send besides one array: arrays of several dtypes and layouts, a numpy
    scalar and dtype, text, bytes and plain containers."""
    return {
        "a": rng.random(10), "b": np.arange(6, dtype="i4").reshape(2, 3), "c": "text",
        "d": [1, 2.5, None], "e": np.float32(1.5), "f": np.array(["ab", "cd"]), "g": (1, b"xy"),
        "h": np.zeros((2, 2), "f4", order="F"), "i": {"n": 1}, "j": np.dtype("f8"),
    }


if __name__ == "__main__":
    sys.exit(main())
