"""Slow clients against a real server (Hypercorn on 127.0.0.1): trickling bodies, a body that
never starts and trickling headers are cut after the read timeout, while a normal client beside
them is answered promptly throughout and the server stays healthy."""

from __future__ import annotations

import contextlib
import pickle
import select
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np

from studio_plugins.testing import ServerProcess

TRICKLERS = 50
READ_TIMEOUT = 1.0  # --read-timeout; Hypercorn's header (keep-alive) timeout follows it down


def open_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    sock.setblocking(False)
    return sock


def body_head(length: int) -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/python-pickle\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def test_slow_clients_are_cut_while_a_normal_client_is_served(modeldir: Path) -> None:
    with ServerProcess("exp", "--read-timeout", f"{READ_TIMEOUT:g}", "--min-rate", "500") as server:
        port = int(server.url.rstrip("/").rsplit(":", 1)[1])
        body = pickle.dumps({"x": np.arange(10.0)})
        # 50 bodies trickling at 4 bytes/s, one that never starts, one request whose headers
        # trickle in (slowloris)
        started = time.monotonic()  # before any: none can be cut before the timeout
        tricklers = [open_request(port, body_head(1000)) for _ in range(TRICKLERS)]
        silent = open_request(port, body_head(100))
        slow_headers = open_request(port, b"POST / HTTP/1.1\r\nHost: test\r\n")
        slow = [*tricklers, silent, slow_headers]
        replies: dict[socket.socket, bytes] = {sock: b"" for sock in slow}
        closed: dict[socket.socket, float] = {}
        latencies = []
        next_byte = 0.0
        while len(closed) < len(slow) and time.monotonic() - started < 6:
            now = time.monotonic()
            if now >= next_byte:  # one more byte from each trickler (and header byte)
                next_byte = now + 0.25
                for sock in [*tricklers, slow_headers]:
                    if sock not in closed:
                        with contextlib.suppress(OSError):  # closed: seen by recv below
                            sock.send(b"x" if sock is not slow_headers else b"X")
            readable, _, _ = select.select([s for s in slow if s not in closed], [], [], 0)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                replies[sock] += data
                if not data:
                    closed[sock] = time.monotonic() - started
            # the normal client, beside them
            sent = time.monotonic()
            request = urllib.request.Request(server.url, data=body, method="POST",
                                             headers={"Content-Type": "application/python-pickle"})
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 200
                assert pickle.loads(response.read())["x"].tolist() == list(np.arange(10.0))
            latencies.append(time.monotonic() - sent)
        for sock in slow:
            sock.close()

        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow connections still open"
        for sock in [*tricklers, silent]:
            assert replies[sock].startswith(b"HTTP/1.1 408 "), replies[sock][:200]
            # cut between the timeout and a few sweeps after it (4 bytes/s add little)
            assert READ_TIMEOUT <= closed[sock] < READ_TIMEOUT + 1.5, closed[sock]
        assert closed[slow_headers] < READ_TIMEOUT + 1.5  # Hypercorn's header timeout
        assert len(latencies) > 20 and max(latencies) < 0.5, (len(latencies), max(latencies))
        with urllib.request.urlopen(server.url + "v2/health/ready", timeout=5) as response:
            assert response.status == 200
        assert "Traceback" not in server.output()
