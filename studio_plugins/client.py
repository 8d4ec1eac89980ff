"""A small Python client for ``POST /``: pickled dict in, pickled dict out.

Replies are read by the same data-only decoder the server uses on requests, within a size limit,
so a hostile server cannot run code in the client, nor hang or bloat it.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from core.errors import StudioError
from core.http.failed_keys import FAILED_COUNT, FAILED_KEYS, parse_failed
from core.types import Reply
from core.wire.safe_pickle import dumps, restricted_loads
from studio_plugins.tls import CA_FILE_ENV, client_context

PICKLE = "application/python-pickle"


class PredictionError(StudioError):
    """The server answered with an error status; ``status`` and ``message`` are the server's."""

    def __init__(self, status: int, message: str, type_name: str = "") -> None:
        prefix = f"{status} {type_name}" if type_name else str(status)
        super().__init__(f"{prefix}: {message}")
        self.status = status
        self.server_message = message
        self.server_type = type_name


def _error_from(status: int, body: bytes) -> PredictionError:
    try:
        content = json.loads(body)
        return PredictionError(status, str(content.get("error")), str(content.get("type", "")))
    except (ValueError, AttributeError):
        return PredictionError(status, body[:500].decode("utf-8", "replace"))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are answered, not followed: urllib would send the request again, a POST turned
    into a GET, with its ``Authorization`` header, to whatever host the ``Location`` names."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


def _redirect_error(url: str, status: int, location: str | None) -> PredictionError:
    if not location:
        return PredictionError(status, f"{url} redirects without saying where")
    target = urllib.parse.urljoin(url, location)
    hint = ""
    if url.lower().startswith("http:") and target.lower().startswith("https:"):
        hint = " (the server wants HTTPS)"
    return PredictionError(
        status, f"{url} redirects to {target}{hint}; not followed, as it would resend the "
        "request and its token there: call that URL if you trust it")


CERT_HAS_EXPIRED = 10
"""OpenSSL's ``X509_V_ERR_CERT_HAS_EXPIRED``, as ``SSLCertVerificationError.verify_code``."""

DEFAULT_TIMEOUT = 120.0
"""Seconds ``predict`` waits for a reply unless told otherwise: a server that never answers
must not hang its client."""


def predict(
    url: str,
    data: dict[str, Any],
    token: str | None = None,
    timeout: float | None = None,
    max_reply: int = 1 << 30,
    *,
    cafile: str | os.PathLike[str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """POST ``data`` (a dict of named arrays) to ``url`` and return the model's dict.

    It is a ``Reply``: ``failed`` names the keys whose ``None`` is a failure (a ``ModelPipe``
    item that raised or passed its deadline), from the reply's ``X-Studio-Failed-Keys``
    header; ``failed_count`` is how many failed, more than ``len(failed)`` only when the
    server left keys off a header of over 4 KiB.

    ``token`` defaults to ``$STUDIO_TOKEN``, as the server's ``--token`` does. ``timeout`` is in
    seconds (default ``DEFAULT_TIMEOUT``; ``math.inf`` waits for ever).

    The reply is read as data by the same decoder the server uses on requests, never unpickled:
    a server that answers anything but plain data, or more than ``max_reply`` bytes of it
    (shared references counted each time), raises ``PredictionError``.

    An ``https://`` server's certificate is verified (studio_plugins/tls.py): against ``cafile``
    (a PEM file of CAs), else ``$STUDIO_CA_FILE``, else the system's CAs plus the CA the CLI keeps
    for the servers it launches. ``context`` replaces all that, e.g. to present a client
    certificate to a server started with ``--ca-certs``.

    A redirect is not followed (it would take the token along to wherever it points): it raises
    ``PredictionError`` with the status and the URL it names."""
    headers = {"Content-Type": PICKLE, "Accept": PICKLE}
    if token is None:
        token = os.environ.get("STUDIO_TOKEN")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=dumps(data), headers=headers, method="POST")
    if context is None and url.lower().startswith("https:"):
        context = client_context(cafile)
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=None if math.isinf(timeout) else timeout) as response:
            body = response.read(max_reply + 1)
            if len(body) > max_reply:
                raise PredictionError(200, f"the reply is larger than max_reply ({max_reply} bytes)")
            failed, failed_count = parse_failed(response.headers.get(FAILED_KEYS.decode()),
                                                response.headers.get(FAILED_COUNT.decode()))
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise _redirect_error(url, exc.code, exc.headers.get("Location")) from None
        raise _error_from(exc.code, exc.read()) from None
    except TimeoutError:
        raise PredictionError(0, f"no reply from {url} within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            if exc.reason.verify_code == CERT_HAS_EXPIRED:  # another CA would not help
                raise PredictionError(
                    0, f"the certificate of {url} has expired (or this machine's clock is "
                    "wrong): the server needs a new one; one launched with --cloud ec2 gets a "
                    "certificate for 30 days, so launch it again") from None
            raise PredictionError(
                0, f"cannot verify the certificate of {url}: {exc.reason.verify_message}; pass "
                f"cafile= (or set ${CA_FILE_ENV}) to the CA that signed it") from None
        raise PredictionError(0, f"cannot reach {url}: {exc}") from None
    except (http.client.HTTPException, ConnectionError, ssl.SSLError) as exc:
        # (an SSLError after the handshake: a server that wants a client certificate, --ca-certs)
        hint = ""
        if isinstance(exc, http.client.RemoteDisconnected) and url.lower().startswith("http:"):
            hint = " (an HTTPS server closes plain HTTP connections so: try https://)"
        raise PredictionError(0, f"cannot reach {url}: {exc}{hint}") from None
    try:
        result = restricted_loads(body, max_reply)
    except StudioError as exc:
        raise PredictionError(200, f"the server's reply is not plain data: {exc.message}") from None
    if not isinstance(result, dict):
        raise PredictionError(200, f"the server answered a {type(result).__name__}, not a dict")
    return Reply(result, failed, failed_count)
