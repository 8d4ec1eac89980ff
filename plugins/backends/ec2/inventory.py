"""Finding our servers (``ls``) and ending them (``stop``).

``ls`` and ``stop`` act only on instances tagged ``studio-plug:managed=true`` (see
``instances.py``), never on others; ``stop`` then deletes our security groups that no live
instance uses any more.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from plugins.aws import aws_errors
from plugins.backends.ec2.backoff import Backoff, Sleep
from plugins.backends.ec2.firewall import MANAGED_TAG, delete_group
from plugins.backends.ec2.instances import (
    KEY_TAG,
    LIVE_STATES,
    PORT_TAG,
    SCHEME_TAG,
    STARTED_BY_TAG,
    describe,
    tags_of,
)
from plugins.backends.ec2.parameters import RUN_TAG
from studio_plugins import BackendError


@dataclass(frozen=True)
class Server:
    instance_id: str
    key: str
    address: str
    port: int
    instance_type: str
    state: str
    launched: datetime
    started_by: str
    group_ids: tuple[str, ...]
    run: str = ""
    """The run id naming its parameters (``parameters.py``)."""
    scheme: str = "http"
    spot: bool = False
    """Runs on spot capacity (``--spot``)."""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.port}/" if self.address else "-"

    @classmethod
    def from_instance(cls, instance: dict[str, Any]) -> Server:
        tags = tags_of(instance)
        try:
            port = int(tags.get(PORT_TAG, "0"))
        except ValueError:
            port = 0
        return cls(
            instance_id=instance["InstanceId"],
            key=tags.get(KEY_TAG, "?"),
            address=instance.get("PublicIpAddress") or instance.get("PublicDnsName") or "",
            port=port,
            instance_type=instance.get("InstanceType", "?"),
            state=instance.get("State", {}).get("Name", "?"),
            launched=instance.get("LaunchTime") or datetime.now(UTC),
            started_by=tags.get(STARTED_BY_TAG, "?"),
            group_ids=tuple(g["GroupId"] for g in instance.get("SecurityGroups", [])),
            run=tags.get(RUN_TAG, ""),
            scheme="https" if tags.get(SCHEME_TAG) == "https" else "http",
            spot=instance.get("InstanceLifecycle") == "spot",
        )


def servers(ec2: Any, ids: Iterable[str] = (), states: Iterable[str] = LIVE_STATES) -> list[Server]:
    """Our instances (tagged as ours) in ``states``, oldest first."""
    filters = [
        {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]},
        {"Name": "instance-state-name", "Values": list(states)},
    ]
    found = [Server.from_instance(i) for i in describe(ec2, filters, ids)]
    return sorted(found, key=lambda s: (s.launched, s.instance_id))


def terminate(ec2: Any, instance_ids: list[str], timeout: float, sleep: Sleep = time.sleep) -> list[str]:
    """Terminate and wait (at most ``timeout`` s) until they are; returns those not yet gone."""
    if not instance_ids:
        return []
    with aws_errors(BackendError, ", ".join(instance_ids)):
        ec2.terminate_instances(InstanceIds=instance_ids)
    backoff = Backoff(timeout, sleep=sleep)
    while True:
        left = [s.instance_id for s in servers(ec2, instance_ids, LIVE_STATES)]
        if not left or backoff.spent:
            return left
        backoff.pause()


def unused_groups(ec2: Any) -> list[str]:
    """Our security groups that no live instance uses."""
    with aws_errors(BackendError, "security groups"):
        groups = ec2.describe_security_groups(
            Filters=[{"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
        )["SecurityGroups"]
        unused = []
        for group in groups:
            users = describe(ec2, [
                {"Name": "instance.group-id", "Values": [group["GroupId"]]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ])
            if not users:
                unused.append(str(group["GroupId"]))
    return sorted(unused)


def delete_unused_groups(ec2: Any, timeout: float = 60.0) -> tuple[list[str], list[str]]:
    """(deleted, still there) among our groups no live instance uses."""
    deleted: list[str] = []
    kept: list[str] = []
    for group_id in unused_groups(ec2):
        (deleted if delete_group(ec2, group_id, timeout) else kept).append(group_id)
    return deleted, kept
