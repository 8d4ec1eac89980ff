"""Removing a fleet by name (``stop NAME``): in dependency order, only parts that carry the fleet's
tags, tolerating parts already gone so that it can run again after a partial failure."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from plugins.backends.ec2.autoscaling import (
    delete_launch_template,
    delete_scaling_group,
    find_launch_template,
    find_scaling_group,
)
from plugins.backends.ec2.balancer import (
    delete_balancer,
    delete_target_group,
    find_balancer,
    find_target_group,
)
from plugins.backends.ec2.firewall import delete_group
from plugins.backends.ec2.fleet import FLEET, FLEET_TAG, ROLE_TAG, Clients, ours
from plugins.backends.ec2.fleet_inventory import tagged_security_groups
from plugins.backends.ec2.fleet_tls import delete_certificate, tagged_certificates
from plugins.backends.ec2.instances import tags_of
from plugins.backends.ec2.parameters import delete_parameters, our_parameters
from plugins.backends.ec2.plan import say
from studio_plugins import BackendError


@dataclass
class Stopped:
    """What ``stop_fleet`` did: ``removed`` and ``left`` (with why) are lines to show."""

    removed: list[str] = dataclasses.field(default_factory=list)
    left: list[str] = dataclasses.field(default_factory=list)
    foreign: list[str] = dataclasses.field(default_factory=list)
    """Things named like the fleet that are not ours: left alone."""


def stop_fleet(c: Clients, name: str, timeout: float = 300.0,
               progress: Callable[[str], None] = say) -> Stopped:
    """Remove fleet ``name`` in dependency order: the group with its instances, the listeners
    and the balancer, the certificate imported for it (after the listener that used it), the
    target group, the launch template, then the security groups (the replicas' first: its rule
    names the balancer's). Parts already gone are skipped, so this can run again after a
    partial failure."""
    done = Stopped()

    def step(what: str, action: Callable[[], bool]) -> None:
        progress(f"deleting {what}")
        try:
            finished = action()
        except BackendError as exc:
            done.left.append(f"{what}: {exc.message}")
            return
        (done.removed if finished else done.left).append(what if finished else f"{what}: not gone yet")

    def remove(kind: str, find: Callable[[], Any], label: Callable[[Any], str],
               delete: Callable[[Any], bool]) -> None:
        """One part, if it exists: deleted when it carries our tags, else reported as foreign."""
        found = find()
        if found is None:
            return
        if not ours(found, name):
            done.foreign.append(f"{kind} {name}")
            return
        step(label(found), lambda: delete(found))

    remove("auto scaling group", lambda: find_scaling_group(c.asg, name),
           lambda g: f"auto scaling group {name} ({len(g.get('Instances', []))} instance(s))",
           lambda g: delete_scaling_group(c.asg, c.ec2, name, timeout))
    remove("load balancer", lambda: find_balancer(c.elb, name),
           lambda b: f"load balancer {name} and its listener",
           lambda b: delete_balancer(c.elb, b["LoadBalancerArn"], timeout))
    if c.acm is not None:  # ours only: a --certificate-arn one carries no fleet tags
        try:
            certificates = [str(t["CertificateArn"]) for t in tagged_certificates(c.acm, FLEET_TAG, name)
                            if ours(t, name)]
        except BackendError as exc:
            done.left.append(f"certificates: {exc.message}")
            certificates = []
        for arn in certificates:
            step(f"certificate {arn}", functools.partial(delete_certificate, c.acm, arn, timeout))
    remove("target group", lambda: find_target_group(c.elb, name),
           lambda t: f"target group {name}",
           lambda t: delete_target_group(c.elb, t["TargetGroupArn"], timeout))
    remove("launch template", lambda: find_launch_template(c.ec2, name),
           lambda t: f"launch template {t['LaunchTemplateId']}",
           lambda t: delete_launch_template(c.ec2, t["LaunchTemplateId"]))
    if c.ssm is not None:  # the token: by its tags, whatever else is left
        try:
            found = [str(p["Name"]) for p in our_parameters(c.ssm, FLEET, fleet=name)]
        except BackendError as exc:
            done.left.append(f"parameters: {exc.message}")
            found = []
        if found:
            step(f"parameters {', '.join(found)}",
                 lambda: set(delete_parameters(c.ssm, found)) == set(found))
    groups = tagged_security_groups(c.ec2, name)
    for sg in sorted(groups, key=lambda g: tags_of(g).get(ROLE_TAG) != "replicas"):
        step(f"security group {sg['GroupId']} ({tags_of(sg).get(ROLE_TAG, '?')})",
             functools.partial(delete_group, c.ec2, sg["GroupId"], timeout))
    return done
