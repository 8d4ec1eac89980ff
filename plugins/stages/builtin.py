"""The built-in pipe stages: ``fetch_url``, ``decode_image`` and ``resize_to_model_input``.

Each is a per-item function; keyword parameters are bound with ``pipe.stage(name, **params)``::

    pipe.add("fetch_url", num_workers=4, timeout=5)
    pipe.add(pipe.stage("fetch_url", max_bytes=1 << 20))
    pipe.add(pipe.stage("resize_to_model_input", model=model))
"""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from studio_plugins import MissingDependencyError, Stage, StudioError, hookimpl
from studio_plugins.model_util import to_model_input

SCHEMES = ("http", "https")
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
_CHUNK = 64 * 1024


class FetchError(StudioError):
    """A URL could not be fetched: bad scheme, HTTP error, too large, too slow."""

    status = 502


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib's default also follows ftp://)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urlparse(newurl).scheme not in SCHEMES:
            raise FetchError(f"{req.full_url} redirects to {newurl}, which is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_HttpOnlyRedirects())


def fetch_url(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """GET ``url`` (http or https) and return its body.

    ``timeout`` bounds the whole download, not only each socket read; a body over ``max_bytes``
    is refused (from Content-Length when sent, else while reading)."""
    if not isinstance(url, str):
        raise FetchError(f"fetch_url takes a URL string, not {type(url).__name__}")
    scheme = urlparse(url).scheme
    if scheme not in SCHEMES:
        raise FetchError(f"refusing to fetch {url!r}: only http and https URLs are fetched")
    deadline = time.monotonic() + timeout
    try:
        with _opener().open(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"{url}: {declared} bytes is more than the limit of {max_bytes}")
            chunks: list[bytes] = []
            received = 0
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise FetchError(f"{url}: the body is more than the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: not downloaded within {timeout:g}s")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"GET {url}: {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"GET {url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from None


def decode_image(data: bytes) -> Any:
    """Bytes of an image file (PNG, JPEG, ...) -> a Pillow image, fully decoded here."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MissingDependencyError("Pillow", "images") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a broken file fails in this stage and not a later one
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({len(data)} bytes): {exc}") from None
    return image


@hookimpl
def studio_register_stages(register: Callable[[str, Stage], None]) -> None:
    register("fetch_url", fetch_url)
    register("decode_image", decode_image)
    register("resize_to_model_input", to_model_input)
