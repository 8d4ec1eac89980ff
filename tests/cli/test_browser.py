"""The pages in a real headless browser (Debian's Chromium) against a real server: /docs runs its
script and renders every route and model of /openapi.json, GET / lists the models, a hostile
checkpoint name stays text, and a token server's /docs asks for the token and shows nothing else.
The same server (--workers 2 --cors) shows that --cors reaches every worker, and the curl line on
the index page is run as it is written (issue 14).

Without Chromium the browser tests skip, unless STUDIO_REQUIRE_BROWSER=1 (CI sets it when it could
install Chromium): then they fail. STUDIO_SCREENSHOTS=DIR keeps the screenshots they take."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import urllib.request
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from studio_plugins.testing import ServerProcess
from tests.web_app import BROWSER_ACCEPT

torch = pytest.importorskip("torch")

PID_WRAPPER = str(Path(__file__).parent / "data" / "pid_wrapper.py")
HOSTILE = "<img src=x onerror=document.title='pwned'>.pt"
APP_ORIGIN = "http://app.example"


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.fixture(scope="module")
def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("STUDIO_REQUIRE_BROWSER") == "1":
            pytest.fail("STUDIO_REQUIRE_BROWSER=1 but there is no chromium on PATH")
        pytest.skip("no chromium (apt-get install chromium); STUDIO_REQUIRE_BROWSER=1 makes this fail")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Experiments ``exp`` (torch.export: input x, FP32 (N, 3)) and ``evil`` (TorchScript, in a
    file named like markup), and ``pids`` (a wrapper answering its worker's pid); 2 workers.
    (Not two torch.export files: torch cannot read two at once, and the models load in parallel.)"""
    home = tmp_path_factory.mktemp("studioml")
    for key in ("exp", "evil", "plain"):
        (home / "experiments" / key / "modeldir").mkdir(parents=True)
    batch = torch.export.Dim("batch")
    program = torch.export.export(Affine().eval(), (torch.ones(2, 3),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(home / "experiments" / "exp" / "modeldir" / "model.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(Affine().eval())
        torch.jit.save(scripted, str(home / "experiments" / "evil" / "modeldir" / HOSTILE))
    env = {"STUDIOML_HOME": str(home), "STUDIO_STORE": "", "STUDIO_TOKEN": ""}
    with ServerProcess("exp", "evil", "--model", "pids=plain", "--wrapper", f"pids={PID_WRAPPER}",
                       "--workers", "2", "--cors", APP_ORIGIN, env=env) as running:
        yield running


def chromium(browser: str, url: str, profile: Path, *options: str) -> str:
    """Chromium's stdout for ``url`` (``--dump-dom``: the DOM once the page's scripts ran)."""
    profile.mkdir(exist_ok=True)
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *options, url],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(browser: str, url: str, tmp_path: Path, name: str) -> bytes:
    path = tmp_path / name
    chromium(browser, url, tmp_path / "profile", "--hide-scrollbars", "--window-size=1100,1500",
             f"--screenshot={path}")
    image = path.read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 20_000, len(image)
    keep = os.environ.get("STUDIO_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / name)
    return image


def fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET"
          ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_docs_renders_every_route_and_model(browser: str, server: ServerProcess, tmp_path: Path) -> None:
    dom = chromium(browser, server.url + "docs", tmp_path / "profile", "--dump-dom")
    document = json.loads(fetch(server.url + "openapi.json")[2])
    assert '<p id="status" class="muted" hidden="">' in dom, dom[-3000:]  # the script ran to the end
    for path, item in document["paths"].items():  # every route, every method: rendered
        for method in item:
            line = f'<span class="method {method}">{method.upper()}</span><span class="path">{path}</span>'
            assert line in dom
    assert dom.count('<div class="card model">') == 3
    assert "<td>x</td><td>FP32</td><td>(N, 3)</td>" in dom
    assert "<td>x</td><td>any</td><td>not declared</td>" in dom  # TorchScript: names only
    assert "UNKNOWN" not in dom.split("<script")[0]  # no datatype a client could not send
    assert "<dd>torch</dd><dt>checkpoint</dt><dd>model.pt2</dd>" in dom
    assert html.escape(HOSTILE, quote=False) in dom and "<img" not in dom  # text, not an element
    assert "<title>studio-plug API</title>" in dom
    screenshot(browser, server.url + "docs", tmp_path, "studio-docs.png")


def test_a_browser_opening_the_server_gets_its_models(browser: str, server: ServerProcess,
                                                      tmp_path: Path) -> None:
    dom = chromium(browser, server.url, tmp_path / "profile", "--dump-dom")
    assert "<title>studio-plug: 3 models</title>" in dom
    for name in ("exp", "evil", "pids"):
        assert f'id="model-{name}"' in dom
    assert html.escape(HOSTILE, quote=False) in dom and "<img" not in dom
    assert f"curl -s -X POST {server.url}models/exp" in dom and '<a href="docs">' in dom
    screenshot(browser, server.url, tmp_path, "studio-index.png")


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_the_curl_line_of_the_page_runs_as_written(server: ServerProcess, tmp_path: Path) -> None:
    status, _, page = fetch(server.url, {"Accept": BROWSER_ACCEPT})
    assert status == 200
    lines = [html.unescape(line) for line in re.findall(r"<pre>(.*?)</pre>", page.decode())]
    exp = next(line for line in lines if "/models/exp " in line)
    done = subprocess.run(["bash", "-c", exp], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    reply = json.loads(done.stdout)
    # one input, one output: the answer comes back under the key the line sent (one row of 2)
    assert list(reply) == ["x"] and len(reply["x"]) == 1 and len(reply["x"][0]) == 2


def test_cors_reaches_every_worker(server: ServerProcess) -> None:
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}

    def ask(_: int) -> tuple[int, str, str]:
        status, headers, _ = fetch(server.url + "models/exp", preflight, method="OPTIONS")
        assert status == 200 and headers["access-control-allow-origin"] == APP_ORIGIN
        request = urllib.request.Request(server.url + "models/pids", data=b'{"x": [1]}', headers={
            "Origin": APP_ORIGIN, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return (json.loads(response.read())["pid"][0], response.headers["access-control-allow-origin"],
                    response.headers["access-control-expose-headers"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(64)))
    assert len({pid for pid, _, _ in answers}) == 2  # both workers answered, each with CORS
    assert {(origin, exposed) for _, origin, exposed in answers} == {
        (APP_ORIGIN, "X-Request-Id, Retry-After, Inference-Header-Content-Length, X-Studio-Failed-Count, "
                     "X-Studio-Failed-Keys")}
    status, headers, _ = fetch(server.url, {**preflight, "Origin": "http://other.example"}, "OPTIONS")
    assert status == 400 and "access-control-allow-origin" not in {h.lower() for h in headers}


def test_with_a_token_docs_asks_for_it_and_shows_nothing_else(browser: str, tmp_path: Path) -> None:
    home = tmp_path / "studioml"
    (home / "experiments" / "hushhush" / "modeldir").mkdir(parents=True)
    env = {"STUDIOML_HOME": str(home), "STUDIO_STORE": "", "STUDIO_TOKEN": "s3cret"}
    with ServerProcess("hushhush", env=env) as server:
        dom = chromium(browser, server.url + "docs", tmp_path / "profile", "--dump-dom")
        assert '<form id="auth">' in dom and "needs its bearer token" in dom  # the form is shown
        rendered = re.sub(r"<script>.*</script>", "", dom, flags=re.DOTALL)
        assert "hushhush" not in rendered and "/models/{name}" not in rendered
        index = chromium(browser, server.url, tmp_path / "profile", "--dump-dom")
        assert "needs its bearer token" in index and "hushhush" not in index
