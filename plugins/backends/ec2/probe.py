"""Does a server answer yet? ``ls`` asks each one ``GET /v2/health/ready``, all at once and
briefly, so a list of many servers still comes back within a few seconds.

An instance is "running" long before its server answers: the boot script installs Python
packages and frameworks first (minutes). The answer is one word a person can act on.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable

READY = "ready"
"""``/v2/health/ready`` answered 200: the model is loaded and serves."""
LOADING = "loading"
"""The server answers 503: up, the model not loaded yet."""
BOOTING = "booting"
"""Nothing answers (yet): installing, or the server has gone."""
PROBE_TIMEOUT = 3.0


def probe(url: str, timeout: float = PROBE_TIMEOUT) -> str:
    """One word for ``url`` (a server's base URL, ending in ``/``); ``-`` when it has none,
    ``http-NNN`` when something answers there with a status our server does not give.

    The health path needs no token. The certificate is not checked: this asks only whether
    something answers there, and sends nothing secret."""
    if not url.startswith(("http://", "https://")):
        return "-"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url + "v2/health/ready", timeout=timeout, context=context) as r:
            return READY if r.status == 200 else f"http-{r.status}"
    except urllib.error.HTTPError as exc:
        return LOADING if exc.code == 503 else f"http-{exc.code}"
    except (OSError, ValueError):
        return BOOTING


def probe_all(urls: Iterable[str], timeout: float = PROBE_TIMEOUT) -> dict[str, str]:
    """``probe`` of every URL at once, in daemon threads, back within about ``timeout`` + 1 s
    whatever the servers do: one still talking then (a slow drip) counts as not answering."""
    wanted = sorted(set(urls))
    answers: dict[str, str] = {}

    def ask(url: str) -> None:
        answers[url] = probe(url, timeout)

    threads = [threading.Thread(target=ask, args=(url,), daemon=True) for url in wanted]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 1.0
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return {url: answers.get(url, BOOTING) for url in wanted}
