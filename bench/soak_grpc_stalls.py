"""Soak: gRPC calls that send part of their message and stall, for as long as asked.

``studio-plug serve`` on the identity model with ``--grpc-port``, ``--token`` and
``--read-timeout`` (2 s here). ``--connections`` raw HTTP/2 connections (the ``h2`` package, as a
hostile client writes frames) each open ``--calls`` ModelInfer calls at a time with the token, send
10 KB of a message that claims 100 KB, and wait for the server to end them; then again, until
``--duration`` is up. Meanwhile a well-behaved client (``tritonclient.grpc``) calls every quarter
second. Printed at the end: how the stalled calls ended and the longest one, the peak of
``studio_requests_in_flight``, the server's RSS at the start, peak and end, and the good client's
latency and errors. A stalled call used to be held until its connection closed; now
``--read-timeout`` ends it (plugins/protocols/grpc/service.py).

    python -m bench.soak_grpc_stalls                       # 20 connections x 100 calls, 30 s
    python -m bench.soak_grpc_stalls -c 40 -n 200 -d 120
"""

from __future__ import annotations

import argparse
import collections
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import numpy as np

from bench.harness import SETTLE_SECONDS, studio_server

TOKEN = "soak-token"
READ_TIMEOUT = 2.0
PARTIAL = b"\0" + (100_000).to_bytes(4, "big") + bytes(10_000)  # 10 KB of a 100 KB message


def stalling_connection(target: str, calls: int, until: float, outcomes: collections.Counter[str],
                        longest: list[float], lock: threading.Lock) -> None:
    """Open ``calls`` stalled calls at a time on one connection until ``until``."""
    host, port = target.rsplit(":", 1)
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", host),
               (":path", "/inference.GRPCInferenceService/ModelInfer"),
               ("content-type", "application/grpc"), ("te", "trailers"),
               ("authorization", f"Bearer {TOKEN}")]
    opened: dict[int, float] = {}

    def receive(sock: socket.socket, conn: h2.connection.H2Connection) -> None:
        """Read what the server sent: window updates, and the ends of our calls."""
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in conn.receive_data(data):
            stream = getattr(event, "stream_id", None)
            if stream not in opened:
                continue
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                status = dict(event.headers).get(b"grpc-status")
                if status is None:
                    continue
                outcome = f"grpc-status {status.decode()}"
            elif isinstance(event, h2.events.StreamReset):
                outcome = f"reset {event.error_code!r}"
            else:
                continue
            with lock:
                outcomes[outcome] += 1
                longest[0] = max(longest[0], time.monotonic() - opened.pop(stream))
        sock.sendall(conn.data_to_send())

    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            while time.monotonic() < until:
                for _ in range(calls):
                    stream = conn.get_next_available_stream_id()
                    conn.send_headers(stream, headers)
                    while conn.local_flow_control_window(stream) < len(PARTIAL):
                        sock.sendall(conn.data_to_send())
                        receive(sock, conn)  # the server opens the window as it reads
                    conn.send_data(stream, PARTIAL)
                    opened[stream] = time.monotonic()
                sock.sendall(conn.data_to_send())
                while opened:
                    receive(sock, conn)
    except Exception as exc:  # a refused stream, a closed connection: counted, not fatal
        with lock:
            outcomes[f"connection ended: {type(exc).__name__}"] += 1


def in_flight(url: str) -> float:
    import urllib.request

    request = urllib.request.Request(url + "metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        found = re.search(rb"^studio_requests_in_flight (\S+)", response.read(), re.M)
    return float(found.group(1)) if found else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_grpc_stalls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--connections", type=int, default=20)
    parser.add_argument("-n", "--calls", type=int, default=100, help="stalled calls per connection")
    parser.add_argument("-d", "--duration", type=float, default=30.0)
    args = parser.parse_args(argv)
    import tritonclient.grpc as grpcclient

    with tempfile.TemporaryDirectory(prefix="studio-soak-") as home:
        (Path(home) / "experiments" / "ident" / "modeldir").mkdir(parents=True)
        with studio_server("ident", "--grpc-port", "0", "--read-timeout", str(READ_TIMEOUT),
                           home=Path(home), env={"STUDIO_TOKEN": TOKEN}) as server:
            assert server.process is not None
            pid = server.process.pid
            time.sleep(SETTLE_SECONDS)
            rss_start = rss_mb(pid)
            outcomes: collections.Counter[str] = collections.Counter()
            longest, lock = [0.0], threading.Lock()
            until = time.monotonic() + args.duration
            attackers = [threading.Thread(target=stalling_connection, daemon=True, args=(
                server.grpc_target, args.calls, until, outcomes, longest, lock))
                for _ in range(args.connections)]
            for thread in attackers:
                thread.start()
            client = grpcclient.InferenceServerClient(server.grpc_target)
            x = grpcclient.InferInput("x", [4], "FP32")
            x.set_data_from_numpy(np.arange(4, dtype=np.float32))
            latencies, errors, peak_in_flight, peak_rss = [], 0, 0.0, rss_start
            while any(thread.is_alive() for thread in attackers):
                started = time.monotonic()
                try:
                    client.infer("ident", [x], headers={"authorization": f"Bearer {TOKEN}"},
                                 client_timeout=10)
                    latencies.append((time.monotonic() - started) * 1000)
                except Exception:  # any failure of the good client counts
                    errors += 1
                peak_in_flight = max(peak_in_flight, in_flight(server.url))
                peak_rss = max(peak_rss, rss_mb(pid))
                time.sleep(0.25)
            client.close()
            time.sleep(READ_TIMEOUT + 1)
            after_in_flight, rss_end = in_flight(server.url), rss_mb(pid)
    print(f"# soak_grpc_stalls: {args.connections} connections x {args.calls} stalled calls, "
          f"{args.duration:g} s, --read-timeout {READ_TIMEOUT:g}")
    print(f"stalled calls ended: {dict(outcomes)}; the longest took {longest[0]:.2f} s")
    print(f"in flight: peak {peak_in_flight:.0f}, after {after_in_flight:.0f}")
    print(f"server RSS: {rss_start:.0f} MB at the start, {peak_rss:.0f} peak, {rss_end:.0f} at the end")
    if latencies:
        print(f"good client: {len(latencies)} calls, median {statistics.median(latencies):.1f} ms, "
              f"max {max(latencies):.0f} ms, {errors} errors")
    return 0 if after_in_flight == 0 and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
