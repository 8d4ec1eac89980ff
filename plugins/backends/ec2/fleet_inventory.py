"""Finding fleets (``ls``, and the names ``stop`` accepts): by their parts tagged
``studio-plug:managed=fleet``, so a fleet shows as long as any part of it is left."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from plugins.aws import aws_errors
from plugins.backends.ec2.autoscaling import (
    GROUP_TAG,
    in_service,
    tagged_launch_templates,
    tagged_scaling_groups,
)
from plugins.backends.ec2.balancer import tagged_balancers, tagged_target_groups, tolerating
from plugins.backends.ec2.firewall import MANAGED_TAG
from plugins.backends.ec2.fleet import FLEET, FLEET_TAG, LB_PORT_TAG, LB_SCHEME_TAG, Clients, balancer_url
from plugins.backends.ec2.fleet_tls import tagged_certificates
from plugins.backends.ec2.instances import KEY_TAG, LIVE_STATES, STARTED_BY_TAG, describe, tags_of
from plugins.backends.ec2.parameters import RUN_TAG, our_parameters
from studio_plugins import BackendError

log = logging.getLogger("studio_plugins.ec2")


@dataclass(frozen=True)
class Fleet:
    name: str
    key: str
    desired: int | None
    in_service: int | None
    url: str
    created: datetime
    started_by: str
    run: str = ""
    """The run id naming its parameters (``parameters.py``)."""
    spot: int | None = None
    """How many of its live replicas run on spot capacity; None for a fleet without --spot."""


def tagged_security_groups(ec2: Any, name: str | None = None) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{MANAGED_TAG}", "Values": [FLEET]}]
    if name:
        filters.append({"Name": f"tag:{FLEET_TAG}", "Values": [name]})
    with aws_errors(BackendError, "security groups"):
        return list(ec2.describe_security_groups(Filters=filters)["SecurityGroups"])


def spot_replicas(ec2: Any, name: str) -> int:
    """The fleet's live replicas that run on spot capacity."""
    found = describe(ec2, [{"Name": f"tag:{GROUP_TAG}", "Values": [name]},
                           {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
    return sum(1 for i in found if i.get("InstanceLifecycle") == "spot")


def certificates(c: Clients) -> list[dict[str, Any]]:
    """The certificates imported for fleets; none when ACM cannot be read (a user allowed no
    ``acm:ListCertificates`` still sees their fleets by their other parts)."""
    if c.acm is None:
        return []
    try:
        return tagged_certificates(c.acm, MANAGED_TAG, FLEET)
    except BackendError as exc:
        log.warning("could not list the fleets' certificates: %s", exc.message)
        return []


def parameters(c: Clients) -> list[dict[str, Any]]:
    """The fleets' parameters (their tokens), with their ``Tags`` as EC2 gives them, so that a
    fleet whose token is all that is left still shows (and ``stop --all`` deletes it); none when
    Parameter Store cannot be read."""
    if c.ssm is None:
        return []
    found: list[dict[str, Any]] = []
    try:
        for parameter in our_parameters(c.ssm, FLEET):
            answer = tolerating(["InvalidResourceId"], "parameter tags", c.ssm.list_tags_for_resource,
                                ResourceType="Parameter", ResourceId=parameter["Name"])
            if answer is not None:  # else: deleted meanwhile
                found.append({**parameter, "Tags": answer.get("TagList", []),
                              "CreateTime": parameter.get("LastModifiedDate")})
    except BackendError as exc:
        log.warning("could not list the fleets' parameters: %s", exc.message)
        return []
    return found


def fleets(c: Clients) -> list[Fleet]:
    """Every fleet with any part left, oldest first; parts that are gone show as ``-``."""
    groups = {tags_of(g).get(FLEET_TAG, ""): g for g in tagged_scaling_groups(c.asg, MANAGED_TAG, FLEET)}
    balancers = {tags_of(b).get(FLEET_TAG, ""): b for b in tagged_balancers(c.elb, MANAGED_TAG, FLEET)}
    # the parameters first, so that any other part wins: theirs carry no experiment key
    others = {tags_of(r).get(FLEET_TAG, ""): r for r in [
        *parameters(c), *tagged_launch_templates(c.ec2, MANAGED_TAG, FLEET),
        *tagged_target_groups(c.elb, MANAGED_TAG, FLEET), *tagged_security_groups(c.ec2),
        *certificates(c)]}
    found = []
    for name in sorted((set(groups) | set(balancers) | set(others)) - {""}):
        group, balancer = groups.get(name), balancers.get(name)
        tags = tags_of(group or balancer or others[name])
        url = "-"
        if balancer:
            port = int(tags_of(balancer).get(LB_PORT_TAG, "80"))
            url = balancer_url(balancer["DNSName"], port,
                               https=tags_of(balancer).get(LB_SCHEME_TAG) == "https")
        created = ((group or {}).get("CreatedTime") or (balancer or {}).get("CreatedTime")
                   or others.get(name, {}).get("CreateTime") or datetime.now(UTC))
        found.append(Fleet(
            name=name, key=tags.get(KEY_TAG, "?"),
            desired=int(group["DesiredCapacity"]) if group else None,
            in_service=in_service(group) if group else None,
            url=url, created=created, started_by=tags.get(STARTED_BY_TAG, "?"),
            run=tags.get(RUN_TAG, ""),
            spot=spot_replicas(c.ec2, name) if group and group.get("MixedInstancesPolicy") else None,
        ))
    return sorted(found, key=lambda f: (f.created, f.name))


def fleet_names(c: Clients) -> list[str]:
    return [f.name for f in fleets(c)]
