"""Our instances: their tags, describing them and waiting for them to run and to be ready.

Every instance we start carries ``studio-plug:managed=true`` plus the experiment key, the port
and who started it; ``ls`` and ``stop`` (``inventory.py``) act on tagged instances only, never
on others.
"""

from __future__ import annotations

import getpass
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from plugins.aws import aws_errors, error_code
from plugins.backends.ec2.backoff import Backoff, Sleep
from studio_plugins import BackendError

KEY_TAG = "studio-plug:key"
PORT_TAG = "studio-plug:port"
STARTED_BY_TAG = "studio-plug:started-by"
STORE_TAG = "studio-plug:store"
SCHEME_TAG = "studio-plug:scheme"
"""``https`` when the server serves TLS (``ls`` probes it there), else ``http``."""
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
ENDED_STATES = ("shutting-down", "terminated", "stopping", "stopped")


def started_by() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value[:255]} for key, value in tags.items()]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def describe(ec2: Any, filters: list[dict[str, Any]], ids: Iterable[str] = ()) -> list[dict[str, Any]]:
    kwargs: dict[str, Any] = {"Filters": filters}
    if ids:
        kwargs["InstanceIds"] = list(ids)
    instances = []
    with aws_errors(BackendError, "EC2 instances", missing={
        "InvalidInstanceID.NotFound": ("no such instance: " + ", ".join(ids),
                                       "`studio-plug ls` lists the servers"),
        "InvalidInstanceID.Malformed": ("not an instance id: " + ", ".join(ids),
                                        "instance ids look like i-0123456789abcdef0"),
    }):
        for page in ec2.get_paginator("describe_instances").paginate(**kwargs):
            for reservation in page.get("Reservations", []):
                instances.extend(reservation.get("Instances", []))
    return instances


def wait_for_address(
    ec2: Any, instance_id: str, timeout: float, sleep: Sleep = time.sleep
) -> str:
    """Wait (with backoff, at most ``timeout`` s) until the instance runs with a public address."""
    backoff = Backoff(timeout, first=1.0, factor=2.0, sleep=sleep)
    state = "pending"
    while True:
        try:
            instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        except Exception as exc:
            if error_code(exc) != "InvalidInstanceID.NotFound":  # not yet visible: keep waiting
                with aws_errors(BackendError, instance_id):
                    raise
        else:
            state = instance["State"]["Name"]
            address = instance.get("PublicIpAddress")
            if state == "running" and address:
                return str(address)
            if state in ENDED_STATES:
                reason = instance.get("StateReason", {}).get("Message", "no reason given")
                raise BackendError(f"instance {instance_id} is {state} ({reason})")
        if backoff.spent:
            what = "has no public address" if state == "running" else f"is still {state}"
            raise BackendError(
                f"instance {instance_id} {what} after {timeout:g} s",
                hint="use a subnet that assigns public addresses (--subnet-id), or a longer "
                "--launch-timeout",
            )
        backoff.pause()


def wait_ready(url: str, timeout: float, sleep: Sleep = time.sleep, cafile: str | None = None,
               check_hostname: bool = True) -> None:
    """Poll ``GET {url}v2/health/ready`` until it answers 200 (at most ``timeout`` s); an
    ``https`` URL's certificate must verify against ``cafile`` (default: the system's CAs),
    and name its host unless not ``check_hostname`` (a balancer's certificate that names the
    user's domain: the health path sends nothing secret)."""
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    if context is not None:
        context.check_hostname = check_hostname
    backoff = Backoff(timeout, sleep=sleep)
    last = "no answer"
    while True:
        remaining = backoff.deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url + "v2/health/ready", timeout=max(min(5.0, remaining), 0.1),
                                        context=context) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        if backoff.spent:
            raise BackendError(
                f"{url} was not ready after {timeout:g} s (last: {last})",
                hint="the install can take minutes: use a longer --launch-timeout; the "
                "instance's log is /var/log/studio-plug.log",
            )
        backoff.pause()
