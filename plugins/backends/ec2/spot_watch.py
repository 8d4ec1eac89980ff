"""On a spot instance: watch instance metadata for the two-minute interruption notice and shut
the server down gracefully on it (through core's ``studio_watch_shutdown``).

The user data of a ``--spot`` server exports ``STUDIO_EC2_SPOT_WATCH=1`` (and for a fleet's
replicas ``STUDIO_EC2_SPOT_DRAIN``: how long to answer not-ready first, so that the balancer takes
the replica out before it stops accepting); anywhere else this module does nothing. It polls
``/latest/meta-data/spot/instance-action`` every 5 s as AWS advises, with an IMDSv2 session
token (the instances require one), which answers 404 until EC2 schedules the interruption.
``STUDIO_EC2_METADATA_URL`` points it elsewhere (tests serve the notice from 127.0.0.1).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger("studio_plugins.ec2")

WATCH_ENV = "STUDIO_EC2_SPOT_WATCH"
DRAIN_ENV = "STUDIO_EC2_SPOT_DRAIN"
METADATA_ENV = "STUDIO_EC2_METADATA_URL"
POLL_ENV = "STUDIO_EC2_SPOT_POLL"
METADATA_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL = 21600
POLL = 5.0
TIMEOUT = 2.0
MAX_NOTICE = 4096
"""The most bytes of a notice read (it is a small JSON object)."""


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", name, os.environ[name], default)
        return default
    return value if value >= 0 else default


class Metadata:
    """Instance metadata over IMDSv2: a session token first, then reads that carry it."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.token: str | None = None

    def _token(self) -> str:
        request = urllib.request.Request(
            self.base + TOKEN_PATH, method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            return reply.read(MAX_NOTICE).decode("ascii", "replace").strip()

    def notice(self) -> str | None:
        """The interruption notice (its body), or None while there is none."""
        if self.token is None:
            self.token = self._token()
        request = urllib.request.Request(self.base + ACTION_PATH,
                                         headers={"X-aws-ec2-metadata-token": self.token})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
                return reply.read(MAX_NOTICE).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # the session token expired: a new one next time
                self.token = None
            if exc.code in (401, 404):
                return None
            raise


def describe(notice: str) -> str:
    """``spot interruption notice: terminate at 2026-...`` from the notice's JSON."""
    try:
        data = json.loads(notice)
        action, when = str(data.get("action", "terminate")), str(data.get("time", "soon"))
    except (ValueError, AttributeError):
        action, when = "terminate", "soon"
    return f"spot interruption notice: {action[:20]} at {when[:40]}"


def watch(metadata: Metadata, request: Callable[[str, float], None], drain: float,
          poll: float, stop: threading.Event) -> None:
    """Poll until a notice comes (then ``request`` the shutdown) or ``stop`` is set. Errors
    reaching the metadata service are logged once and polling goes on: the notice matters."""
    failing = False
    while not stop.is_set():
        try:
            notice = metadata.notice()
        except (OSError, ValueError) as exc:
            if not failing:
                log.warning("cannot read the spot interruption notice from %s: %s (retrying)",
                            metadata.base, exc)
            failing, metadata.token = True, None
        else:
            failing = False
            if notice is not None:
                request(describe(notice), drain)
                return
        stop.wait(poll)


def start(request: Callable[[str, float], None]) -> threading.Thread | None:
    """Start the watching thread when this server runs on spot capacity (``WATCH_ENV``)."""
    if os.environ.get(WATCH_ENV) != "1":
        return None
    metadata = Metadata(os.environ.get(METADATA_ENV) or METADATA_URL)
    drain = _seconds(DRAIN_ENV, 0.0)
    thread = threading.Thread(
        target=watch, args=(metadata, request, drain, _seconds(POLL_ENV, POLL) or POLL,
                            threading.Event()),
        name="spot-interruption-watch", daemon=True)
    thread.start()
    log.info("watching %s for a spot interruption notice", metadata.base + ACTION_PATH)
    return thread
