"""Instructions per small request on a real server, ours against the raw ASGI echo, counted by
valgrind's callgrind: the same servers as ``bench_http`` (the identity model; the echo app on the
same Hypercorn), real sockets, one keep-alive connection sending the small pickle of
``bench_http`` (``{"x": 10 float64}``, 214 B).

Each server is run twice under callgrind, answering ``--few`` and then ``--many`` requests, and
the difference of the two totals divided by the difference in requests is its count per request:
start-up and shutdown cancel out. Unlike CPU time on a shared VM the count does not move with
other load, so it is the figure to compare the two servers, or two commits, by. The servers'
own instructions only: the client runs outside valgrind.

    python -m bench.bench_server_instructions                   # ~8 min
    python -m bench.bench_server_instructions --keep /tmp/cg    # and keep the four profiles

Measured (issue 18, 2-core VM, CPython 3.11): ours 1,244,326 and the echo 1,143,023 instructions
per request (echo / ours 0.92); by function (``callgrind_annotate`` on kept profiles), about 43k
of the difference in the interpreter's eval loop and the rest spread over allocation, frames and
lookups; the cyclic garbage collector under 100 in both.
"""

from __future__ import annotations

import argparse
import http.client
import pickle
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bench.harness import _Server, bench_env, describe_machine, print_table

BODY = pickle.dumps({"x": np.zeros(10)}, protocol=5)
COLLECTED = re.compile(r"Collected : (\d+)")


class Callgrind(_Server):
    """A bench server run under callgrind, its profile written to ``out``."""

    out = "/dev/null"

    @property
    def command(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}", *super().command]


def send(url: str, requests: int, connections: int = 1) -> None:
    """``requests`` POSTs of the small pickle, over ``connections`` keep-alive connections at once."""
    if connections > 1:
        share = [requests // connections + (index < requests % connections) for index in range(connections)]
        with ThreadPoolExecutor(connections) as pool:
            list(pool.map(lambda count: send(url, count), share))
        return
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
    headers = {"Content-Type": "application/python-pickle"}
    for _ in range(requests):
        connection.request("POST", "/", body=BODY, headers=headers)
        reply = connection.getresponse()
        reply.read()
        if reply.status != 200:
            raise SystemExit(f"{url}: status {reply.status}")
    connection.close()


def instructions(which: str, requests: int, keep: Path | None, connections: int = 1) -> int:
    """The total instructions of one run of ``which`` answering ``requests`` requests (its
    profile kept in ``keep``, if given, for callgrind_annotate)."""
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as directory:
        home = Path(directory)
        (home / "experiments" / "bench" / "modeldir").mkdir(parents=True)
        env = bench_env({"STUDIOML_HOME": str(home), "PYTHONHASHSEED": "0"})
        if which == "ours":
            server = Callgrind(None, "bench", "--port", "0", "--killafter", "0", env=env)
        else:
            server = Callgrind([sys.executable, "-m", "bench.harness", "asgi", "bench.harness:echo_app"],
                               env=env)
        server.startup_timeout = 600
        if keep is not None:
            server.out = str(keep / f"{which}_{requests}.out")
        with server:
            send(server.url, requests, connections)
            server.stop(timeout=300)
        found = COLLECTED.findall(server.output())
    if not found:
        raise SystemExit(f"valgrind printed no count for {which}:\n{server.output()[-2000:]}")
    return int(found[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_server_instructions",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # from 1300 on: before that, a server still imports and learns (about 25k a request more)
    parser.add_argument("--few", type=int, default=1300)
    parser.add_argument("--many", type=int, default=2300)
    parser.add_argument("-c", "--connections", type=int, default=1,
                        help="keep-alive connections sending at once (default 1)")
    parser.add_argument("--keep", type=Path, help="write the callgrind profiles here "
                        "(compare functions with callgrind_annotate)")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(f"# bench_server_instructions: {describe_machine()}; {args.few} and {args.many} requests "
          f"over {args.connections} connection(s)")
    per_request = {}
    for which in ("ours", "echo"):
        counts = [instructions(which, requests, args.keep, args.connections)
                  for requests in (args.few, args.many)]
        per_request[which] = (counts[1] - counts[0]) / (args.many - args.few)
        print(f"  {which}: {per_request[which]:,.0f} instructions per request", file=sys.stderr)
    print_table([[which, count] for which, count in per_request.items()],
                ["server (real sockets)", "instructions per request"])
    print(f"echo / ours: {per_request['echo'] / per_request['ours']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
