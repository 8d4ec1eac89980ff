"""The hardening issue (#13), shown end to end: every class of hostile body in
``tests/hostile_corpus.py`` sent to one real ``studio-plug serve``, which must stay up, answer each
with a 4xx (or, where the body is valid data, a 200 no bigger than --max-body) within a bound,
keep answering health checks meanwhile, grow by little, and leave numpy's string casts intact.

The server serves two models: ``exp``, the identity model (echoes whatever was decoded, so an
amplified decode shows in the reply), and ``strs``, a wrapper whose answer depends on numpy's
shared unsized ``S``/``U``/``V`` descriptors (so a body that corrupts them shows from outside).
It runs under an address-space limit (RLIMIT_AS, ``ulimit -v``) so that an attack that makes it
allocate tens of GB fails there, not on the machine running the tests.

The tests run in file order and share the server: the per-attack tests first, then the ones that
look back over the whole corpus (deaths, health latency, memory, numpy). If an attack kills or
hangs the server, that attack's test fails and the next test starts a new one (recorded as an
incident, which the look-back tests report), so one fatal case does not hide the others.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import pickle
import random
import socket
import string
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins.testing import ServerProcess
from tests.hostile_corpus import BOUNDED, Attack, attacks
from tests.hostile_pickles import corpus

MAX_BODY = 16 * 2**20
MODEL, STRINGS = "exp", "strs"

# --- bounds -----------------------------------------------------------------------------------
REPLY_WITHIN = 2.0
"""Seconds for a whole hostile request (send, decode, refuse or answer, read). The issue asks for
a second; 2 s allows for a slow 2-core VM shared with other work. The slowest legitimate work in
the corpus, parsing 5.6 MB of JSON numbers before refusing them, takes ~0.4 s there; every other
refusal is a check before allocating."""
REQUEST_TIMEOUT = 10.0
"""The client's own timeout: a hang is a failed test after this, never a stuck suite."""
HEALTH_WITHIN = 1.0
"""Seconds ``GET /v2/health/live`` may take, at any moment of the corpus, polled every 100 ms by a
separate process. A decode that runs on the event loop, or holds the GIL in one C call, for longer
than this shows up; the heaviest legitimate work here (``json.loads`` of 5.6 MB) holds it for
~0.3 s, the worst poll seen with the V2/npz/JSON fixes and a strict pickle decoder. (With both
cores saturated by other processes and that JSON decoded on the event loop, one poll took
1.3 s: a codec must decode off the loop, as the design asks. On main every stall is >= 2.9 s.)"""
RSS_GROWTH = 300 * 2**20
"""Peak resident memory (VmHWM) growth allowed over the corpus, and for any one attack. A request
at the limit holds its body, its decoded arrays and its reply (each <= --max-body, 16 MiB), and
the batching case sends 4 at once: 4 x 3 x 16 MiB = 192 MiB, plus allocator slack. On main the
memory attacks take far more (memo index 2**26: +1 GiB; the npz bomb: +850 MiB; V2 BYTES
[10**12, 0]: +0.5-1.4 GiB in 10 s), so none can hide under this bound."""
ADDRESS_SPACE = 4 * 2**30
"""RLIMIT_AS of the server: an idle one maps ~0.3 GB, a busy one (threads' stacks and malloc
arenas) under 1 GB; 4 GB leaves room for any legitimate request and stops the 16-32 GB attacks
with a MemoryError instead of the machine's OOM killer."""
METRICS_SIZE = 200_000
"""Bytes ``/metrics`` may grow to after 2000 requests to unknown model names: a few KB with
labels for served models only; 4.2 MB on main (one label set per name)."""

# A model whose answer is numpy's string casts: they go wrong for every model in the process
# once the shared unsized S/U/V descriptors have been resized by a hostile scalar. It also
# copies its array inputs (``.copy()`` of a forged structured dtype is a crash on main).
STRINGS_WRAPPER = '''
import numpy as np


def create_model(modeldir):
    def model(data):
        answer = {
            "arange_str": np.arange(5).astype(str).tolist(),
            "float_U": np.array([1.5, -2.25]).astype("U").tolist(),
            "int_S": [b.decode() for b in np.array([12, 345]).astype("S").tolist()],
            "bytes_V_itemsize": int(np.array([b"abcd"]).astype("V").dtype.itemsize),
            "unsized_itemsizes": [np.dtype(code).itemsize for code in "SUV"],
            "str_concat": np.char.add(np.array(["ab"]), np.arange(2).astype(str)).tolist(),
        }
        for key, value in data.items():  # as many models do: work on a copy of the input
            if isinstance(value, np.ndarray):
                answer["copy_" + key] = value.copy()
        return answer

    model.batchable = False
    return model
'''
STRINGS_EXPECTED = {
    "arange_str": ["0", "1", "2", "3", "4"],
    "float_U": ["1.5", "-2.25"],
    "int_S": ["12", "345"],
    "bytes_V_itemsize": 4,
    "unsized_itemsizes": [0, 0, 0],
    "str_concat": ["ab0", "ab1"],
    "copy_q": [0],
}

# Polls GET /v2/health/live every 100 ms on a fresh connection (as a load balancer does) and
# prints one JSON line per poll: its start (monotonic) and latency, or the error. A separate
# process, so the test's own work (building bodies, reading replies) cannot delay a poll.
POLLER = r'''
import http.client, json, sys, time
host, port = sys.argv[1], int(sys.argv[2])
while True:
    started = time.monotonic()
    try:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", "/v2/health/live")
        response = connection.getresponse()
        response.read()
        connection.close()
        outcome = {"status": response.status}
    except Exception as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    outcome.update(at=started, latency=time.monotonic() - started)
    print(json.dumps(outcome), flush=True)
    time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
'''

_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1]))); "
    "os.execv(sys.executable, [sys.executable, '-m', 'studio_plugins', 'serve', *sys.argv[2:]])"
)


class LimitedServer(ServerProcess):
    """``studio-plug serve`` under RLIMIT_AS (exec'd in place: the pid is the server's)."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-c", _LIMIT, str(ADDRESS_SPACE), *self.args]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes (0 once it has died)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


@dataclass
class Reply:
    status: int = 0
    length: int = 0
    """The reply's length (its Content-Length when it has one)."""
    content: bytes = field(default=b"", repr=False)
    """At most MAX_BODY + 1 bytes of it."""
    seconds: float = 0.0
    content_type: str = ""
    error: str = ""
    """Why no reply came (the connection was reset, the client timed out)."""

    @property
    def head(self) -> bytes:
        return self.content[:300]

    def __str__(self) -> str:
        if self.error:
            return f"no reply after {self.seconds:.1f}s: {self.error}"
        return f"{self.status} in {self.seconds:.2f}s, {self.length} bytes: {self.head!r}"


@dataclass
class Served:
    home: Path
    wrapper: Path
    port: int
    server: ServerProcess | None = None
    incidents: list[str] = field(default_factory=list)
    """Each time the server was found dead or hung and restarted: what was found and after what."""
    baseline: dict[str, int] = field(default_factory=dict)
    worst_growth: tuple[int, str] = (0, "")
    """The largest VmHWM growth over one attack, and the attack."""
    last: str = "start"
    """The attack (or check) the server last went into."""

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.process is not None
        return self.server.process.pid

    def start(self) -> None:
        server = LimitedServer(
            MODEL, STRINGS, "--wrapper", f"{STRINGS}={self.wrapper}", "--max-body", str(MAX_BODY),
            "--max-batch-size", "4", "--max-batch-delay", "20", "--port", str(self.port),
            env={"STUDIOML_HOME": str(self.home)},
        )
        for variable in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
            server.env.pop(variable, None)
        server.start()
        self.server = server
        warm_up(self)
        self.baseline = memory(self.pid)

    def alive(self) -> bool:
        process = self.server.process if self.server is not None else None
        return process is not None and process.poll() is None

    def wait_exit(self, timeout: float) -> None:
        if self.server is not None and self.server.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.process.wait(timeout)

    def exit_status(self) -> str:
        assert self.server is not None and self.server.process is not None
        code = self.server.process.poll()
        if code is None:
            return "running"
        return f"killed by signal {-code}" if code < 0 else f"exited with {code}"

    def health(self, timeout: float = HEALTH_WITHIN) -> str:
        """'' when ``GET /v2/health/live`` answered 200 within ``timeout``, else why not."""
        reply = request(self, "GET", "/v2/health/live", b"", {}, timeout=timeout)
        if reply.error or reply.status != 200:
            return reply.error or f"status {reply.status}"
        if reply.seconds > timeout:
            return f"answered in {reply.seconds:.2f}s"
        return ""

    def ensure_up(self, before: str, numpy: bool = False) -> None:
        """Restart a server that died or stopped answering (after the last attack), noting it;
        with ``numpy``, also one whose string casts were corrupted (so that each numpy attack is
        judged on a sound server)."""
        healthy = self.alive() and not self.health(timeout=3.0)
        if healthy and not (numpy and strings_answer(self) != STRINGS_EXPECTED):
            self.last = before
            return
        found = (self.exit_status() if not self.alive() else
                 "numpy's string casts corrupted" if healthy else "not answering health checks")
        self.incidents.append(f"after {self.last!r}: {found}")
        if self.server is not None:
            self.server.kill()
        self.start()
        self.last = before

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=10)


def request(served: Served, method: str, path: str, body: bytes, headers: dict[str, str],
            timeout: float = REQUEST_TIMEOUT) -> Reply:
    """One request on its own connection; reads at most MAX_BODY + 1 bytes of the reply (so an
    amplified reply shows as too long without the test holding all of it)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        declared = response.getheader("Content-Length")
        content = response.read(MAX_BODY + 1)
        length = int(declared) if declared is not None else len(content)
        return Reply(response.status, length, content, time.monotonic() - started,
                     response.getheader("Content-Type") or "")
    except (OSError, http.client.HTTPException) as exc:
        return Reply(seconds=time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


def send(served: Served, attack: Attack) -> list[Reply]:
    """The attack's body, ``attack.concurrent`` times at once (each on its own connection, released
    together, so that the batcher stacks them)."""
    body = attack.body()
    path = attack.path.format(model=MODEL, copying=STRINGS)
    if attack.concurrent == 1:
        return [request(served, "POST", path, body, attack.headers)]
    barrier = threading.Barrier(attack.concurrent)

    def one(_: int) -> Reply:
        barrier.wait(timeout=REQUEST_TIMEOUT)
        return request(served, "POST", path, body, attack.headers)

    with ThreadPoolExecutor(attack.concurrent) as pool:
        return list(pool.map(one, range(attack.concurrent)))


def parses(content: bytes) -> bool:
    try:
        json.loads(content)
    except ValueError:
        return False
    return True


def strings_answer(served: Served) -> Any:
    reply = request(served, "POST", f"/models/{STRINGS}", b'{"q": [0]}', {"Content-Type": "application/json"})
    assert reply.status == 200 and not reply.error, f"the string-cast model: {reply}"
    return json.loads(reply.content)


def warm_up(served: Served) -> None:
    """Ordinary requests in every format, so the baseline memory includes what a first request
    allocates (thread pools, codec tables) and the server is known to work."""
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    reply = request(served, "POST", "/", pickle.dumps({"x": x}, protocol=5),
                    {"Content-Type": "application/python-pickle"})
    assert reply.status == 200, reply
    reply = request(served, "POST", "/", b'{"a": [1, 2, 3]}', {"Content-Type": "application/json"})
    assert reply.status == 200 and json.loads(reply.head) == {"a": [1, 2, 3]}, reply
    npz = io.BytesIO()
    np.savez(npz, x=x)
    reply = request(served, "POST", "/", npz.getvalue(), {"Content-Type": "application/x-npz"})
    assert reply.status == 200, reply
    v2 = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}'
    reply = request(served, "POST", f"/v2/models/{MODEL}/infer", v2, {"Content-Type": "application/json"})
    assert reply.status == 200, reply
    assert strings_answer(served) == STRINGS_EXPECTED


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Poller:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def samples(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("studioml")
    for key in (MODEL, STRINGS):
        (home / "experiments" / key / "modeldir").mkdir(parents=True)
    wrapper = tmp_path_factory.mktemp("wrappers") / "string_casts.py"
    wrapper.write_text(textwrap.dedent(STRINGS_WRAPPER))
    served = Served(home, wrapper, free_port())
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def poller(served: Served) -> Iterator[Poller]:
    """Health polled from another process for as long as the module runs."""
    process = subprocess.Popen([sys.executable, "-c", POLLER, "127.0.0.1", str(served.port)],
                               stdout=subprocess.PIPE, text=True)
    poller = Poller(process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            poller.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield poller
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def stalled(served: Served) -> Iterator[socket.socket]:
    """A request that declares 1000 bytes of body, sends 10 and stalls, for the whole module
    (slow clients proper are tested with the read timeout; here: it must not stop anything)."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/python-pickle\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b"\x80\x05" + b"\x00" * 8)
    try:
        yield sock
    finally:
        sock.close()


# --- the corpus, attack by attack -------------------------------------------------------------

ATTACKS = attacks(MAX_BODY)


def test_served_correctly_before_the_corpus(served: Served, poller: Poller, stalled: socket.socket) -> None:
    # the fixtures start the health poller and the stalled upload before the first attack
    assert served.alive() and not served.health()
    assert strings_answer(served) == STRINGS_EXPECTED


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_hostile_body(served: Served, poller: Poller, stalled: socket.socket, attack: Attack) -> None:
    served.ensure_up(attack.name, numpy=attack.klass == "numpy")
    before = memory(served.pid)["VmHWM"]
    replies = send(served, attack)
    problems = []
    for reply in replies:
        if reply.error:
            problems.append(f"no reply after {reply.seconds:.1f}s: {reply.error}")
            continue
        if attack.statuses and reply.status not in attack.statuses:
            problems.append(f"status {reply.status}, expected {attack.statuses}: {reply.head!r}")
        elif reply.status == 200 and attack.expect == BOUNDED:
            if reply.length > MAX_BODY:
                problems.append(f"a 200 of {reply.length} bytes, more than --max-body ({MAX_BODY})")
            elif reply.content_type.startswith("application/json") and not parses(reply.content):
                problems.append(f"a 200 that is not JSON: {reply.head!r}")
        elif not 400 <= reply.status < 500:
            problems.append(f"status {reply.status}, expected a 4xx: {reply.head!r}")
        if reply.seconds > REPLY_WITHIN:
            problems.append(f"answered in {reply.seconds:.1f}s (bound: {REPLY_WITHIN}s)")
    unhealthy = served.health(timeout=HEALTH_WITHIN)  # the server is still there, and answers
    if unhealthy:
        served.wait_exit(2.0)  # a process that crashes may take a moment to be gone (core dump)
    if not served.alive():
        problems.append(f"the server died: {served.exit_status()}")
    else:
        if unhealthy:
            problems.append(f"health check afterwards: {unhealthy}")
        grown = memory(served.pid)["VmHWM"] - before
        served.worst_growth = max(served.worst_growth, (grown, attack.name))
        if grown > RSS_GROWTH:
            problems.append(f"peak memory grew by {grown / 2**20:.0f} MiB (bound: {RSS_GROWTH // 2**20})")
        if attack.klass == "numpy" and not unhealthy:
            answer = strings_answer(served)
            if answer != STRINGS_EXPECTED:
                problems.append(f"numpy's string casts are corrupted: {answer}")
    assert not problems, f"{attack.name} ({attack.klass}): " + "; ".join(problems)


def test_unknown_model_names_do_not_grow_the_metrics(served: Served, poller: Poller) -> None:
    served.ensure_up("2000 unknown model names")
    rng = random.Random(13)
    statuses = set()
    for _ in range(2000):
        name = "".join(rng.choices(string.ascii_lowercase + string.digits, k=24))
        # a connection each: the server may close one whose body it refused unread
        reply = request(served, "POST", f"/models/{name}", b'{"a": [1]}',
                        {"Content-Type": "application/json"})
        statuses.add(reply.status if not reply.error else reply.error)
    assert statuses == {404}
    reply = request(served, "GET", "/metrics", b"", {})
    assert reply.status == 200 and reply.length < METRICS_SIZE, f"/metrics is {reply.length} bytes"


REPRESENTATIVE = (
    "os.system", "numpy.f2py os.system (dotted name)", "object-dtype array (protocol 5)",
    "object field set by __setstate__", "claimed 2 GB BINBYTES8", "deeply nested lists",
    "deeply nested tuples", "bytes(10**10)", "_reconstruct with a huge shape",
    "field outside the item (out-of-bounds reads)", "subarray bigger than its item",
    "datetime dtype with a version-3 state (segfaults numpy's own __setstate__)",
    "random bytes after a pickle header #0",
)


def test_the_existing_corpus_is_still_refused(served: Served, tmp_path: Path) -> None:
    served.ensure_up("the existing corpus")
    marker = tmp_path / "pwned"
    bodies = corpus(marker, tmp_path)
    problems = []
    for name in REPRESENTATIVE:
        reply = request(served, "POST", "/", bodies[name], {"Content-Type": "application/python-pickle"})
        if reply.error or reply.status != 400 or reply.seconds > REPLY_WITHIN:
            problems.append(f"{name}: {reply}")
    time.sleep(0.2)
    assert not marker.exists(), "a payload ran code on the server"
    assert served.alive() and not problems, problems


def test_a_stalled_upload_does_not_stop_health_checks_or_requests(
    served: Served, stalled: socket.socket
) -> None:
    served.ensure_up("the stalled upload check")
    assert not served.health()
    x = {"x": np.arange(3.0)}
    body = pickle.dumps(x, protocol=5)
    reply = request(served, "POST", "/", body, {"Content-Type": "application/python-pickle"})
    assert reply.status == 200 and reply.seconds < REPLY_WITHIN, reply


# --- over the whole corpus --------------------------------------------------------------------


def test_the_server_never_died_nor_hung(served: Served) -> None:
    served.ensure_up("the end of the corpus")
    assert not served.incidents, "restarted the server: " + "; ".join(served.incidents)


def test_health_checks_answered_within_the_bound_throughout(served: Served, poller: Poller) -> None:
    time.sleep(0.3)  # the last polls
    samples = poller.samples()
    assert samples, "the health poller recorded nothing"
    slow = [s for s in samples if "error" in s or s["latency"] > HEALTH_WITHIN]
    worst = max(samples, key=lambda s: s["latency"])
    assert not slow, (
        f"{len(slow)} of {len(samples)} health checks failed or took over {HEALTH_WITHIN}s; "
        f"worst {worst['latency']:.2f}s; first: {slow[:3]}"
    )


def test_memory_grew_by_little(served: Served) -> None:
    grown, attack = served.worst_growth
    assert grown < RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB over {attack!r}"
    now = memory(served.pid)
    grown = now["VmHWM"] - served.baseline["VmHWM"]
    assert grown < RSS_GROWTH, (
        f"peak RSS grew by {grown / 2**20:.0f} MiB over the corpus (bound {RSS_GROWTH // 2**20} MiB); "
        f"baseline {served.baseline}, now {now}"
        + (f" (the server was restarted: {served.incidents})" if served.incidents else "")
    )


def test_numpy_string_casts_are_intact_after_the_corpus(served: Served) -> None:
    assert served.alive()
    assert strings_answer(served) == STRINGS_EXPECTED

