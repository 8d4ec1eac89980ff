"""A fleet's front: an Application Load Balancer, its HTTP listener and the target group.

The target group sends to ``--port`` on the instances and health-checks ``/v2/health/ready``
there, so an instance gets traffic only once its model is loaded. Every call that removes
something treats "already gone" as done, so ``studio-plug stop`` can be run again after a
partial failure.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from plugins.aws import aws_errors, error_code
from plugins.backends.ec2.backoff import Backoff, Sleep, delete_when_free, wait_until
from plugins.backends.ec2.instances import tag_list, tags_of
from studio_plugins import BackendError

HEALTH_PATH = "/v2/health/ready"


def tolerating(codes: Iterable[str], what: str, call: Callable[..., Any], **kwargs: Any) -> Any:
    """``call(**kwargs)``; None when AWS answers with one of ``codes`` (it is already gone)."""
    try:
        return call(**kwargs)
    except Exception as exc:
        if error_code(exc) in set(codes):
            return None
        with aws_errors(BackendError, what):
            raise


def elb_tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    """Tags as ELB takes them: its values admit letters, digits, spaces and ``_.:/=+-@`` only
    (a comma, as in several experiment keys, is refused), so anything else becomes a space."""
    return [{"Key": t["Key"], "Value": "".join(
        c if c.isalnum() or c.isspace() or c in "_.:/=+-@" else " " for c in t["Value"])}
        for t in tag_list(tags)]


def fleet_subnets(ec2: Any, vpc_id: str) -> dict[str, str]:
    """The VPC's default subnet by availability zone (a balancer needs two zones)."""
    with aws_errors(BackendError, "the subnet lookup"):
        subnets = ec2.describe_subnets(Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "default-for-az", "Values": ["true"]},
        ])["Subnets"]
    by_zone: dict[str, str] = {}
    for subnet in sorted(subnets, key=lambda s: (s["AvailabilityZone"], s["SubnetId"])):
        by_zone.setdefault(subnet["AvailabilityZone"], subnet["SubnetId"])
    if len(by_zone) < 2:
        raise BackendError(
            f"VPC {vpc_id} has default subnets in {len(by_zone)} availability zone(s); a load "
            "balancer needs two",
            hint="use a region whose default VPC is intact (`aws ec2 create-default-subnet "
            "--availability-zone ZONE` restores one)",
        )
    return by_zone


@dataclass(frozen=True)
class Balancer:
    arn: str
    dns_name: str


def create_target_group(elb: Any, name: str, vpc_id: str, port: int, tags: dict[str, str]) -> str:
    with aws_errors(BackendError, f"target group {name}"):
        group = elb.create_target_group(
            Name=name, Protocol="HTTP", Port=port, VpcId=vpc_id, TargetType="instance",
            HealthCheckEnabled=True, HealthCheckProtocol="HTTP", HealthCheckPort="traffic-port",
            HealthCheckPath=HEALTH_PATH, Matcher={"HttpCode": "200"},
            HealthCheckIntervalSeconds=15, HealthyThresholdCount=2, UnhealthyThresholdCount=3,
            Tags=elb_tag_list(tags),
        )["TargetGroups"][0]
    return str(group["TargetGroupArn"])


def create_balancer(
    elb: Any, name: str, subnets: list[str], group_id: str, tags: dict[str, str]
) -> Balancer:
    with aws_errors(BackendError, f"load balancer {name}"):
        balancer = elb.create_load_balancer(
            Name=name, Subnets=subnets, SecurityGroups=[group_id], Scheme="internet-facing",
            Type="application", IpAddressType="ipv4", Tags=elb_tag_list(tags),
        )["LoadBalancers"][0]
    return Balancer(str(balancer["LoadBalancerArn"]), str(balancer["DNSName"]))


def create_listener(elb: Any, balancer_arn: str, port: int, target_group_arn: str,
                    tags: dict[str, str]) -> str:
    with aws_errors(BackendError, f"a listener on port {port}"):
        listener = elb.create_listener(
            LoadBalancerArn=balancer_arn, Protocol="HTTP", Port=port,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": target_group_arn}],
            Tags=elb_tag_list(tags),
        )["Listeners"][0]
    return str(listener["ListenerArn"])


def resource_label(balancer_arn: str, target_group_arn: str) -> str:
    """``app/NAME/ID/targetgroup/NAME/ID``: what ALBRequestCountPerTarget is measured on."""
    return (balancer_arn.split(":loadbalancer/", 1)[1] + "/"
            + target_group_arn.split(":", 5)[5])


def wait_active(elb: Any, arn: str, timeout: float, sleep: Sleep = time.sleep) -> None:
    """Wait (with backoff) until the balancer is provisioned (a few minutes on AWS)."""
    backoff = Backoff(timeout, sleep=sleep)
    while True:
        with aws_errors(BackendError, "the load balancer"):
            found = elb.describe_load_balancers(LoadBalancerArns=[arn])["LoadBalancers"]
        state = found[0]["State"]["Code"] if found else "gone"
        if state == "active":
            return
        if state in ("failed", "gone"):
            reason = found[0]["State"].get("Reason", "") if found else ""
            raise BackendError(f"the load balancer is {state} {reason}".rstrip())
        if backoff.spent:
            raise BackendError(f"the load balancer is still {state} after {timeout:g} s",
                               hint="use a longer --launch-timeout")
        backoff.pause()


# --- finding and removing ------------------------------------------------------------------------


def elb_tags(elb: Any, arns: list[str]) -> dict[str, dict[str, str]]:
    """Tags by ARN (describe_tags takes 20 at a time)."""
    tags: dict[str, dict[str, str]] = {}
    for start in range(0, len(arns), 20):
        with aws_errors(BackendError, "load balancer tags"):
            found = elb.describe_tags(ResourceArns=arns[start:start + 20])["TagDescriptions"]
        for item in found:
            tags[item["ResourceArn"]] = tags_of(item)
    return tags


def _with_tags(elb: Any, resources: list[dict[str, Any]], arn_key: str) -> list[dict[str, Any]]:
    """``resources`` (balancers or target groups) each with its ``Tags``, which ELB's describe
    calls leave out, so that they read like EC2's (``tags_of``)."""
    tags = elb_tags(elb, [r[arn_key] for r in resources])
    return [{**r, "Tags": tag_list(tags.get(r[arn_key], {}))} for r in resources]


@dataclass(frozen=True)
class _Kind:
    """What finding one kind of ELB resource by name or by tag needs to know."""

    what: str
    describe: str
    items: str
    arn: str
    missing: str


_BALANCERS = _Kind("load balancer", "describe_load_balancers", "LoadBalancers", "LoadBalancerArn",
                   "LoadBalancerNotFound")
_TARGET_GROUPS = _Kind("target group", "describe_target_groups", "TargetGroups", "TargetGroupArn",
                       "TargetGroupNotFound")


def _find(elb: Any, kind: _Kind, name: str) -> dict[str, Any] | None:
    found = tolerating([kind.missing], f"{kind.what} {name}", getattr(elb, kind.describe),
                       Names=[name])
    if not found or not found[kind.items]:
        return None
    return _with_tags(elb, found[kind.items][:1], kind.arn)[0]


def find_balancer(elb: Any, name: str) -> dict[str, Any] | None:
    """The balancer named ``name`` with its ``Tags``, or None."""
    return _find(elb, _BALANCERS, name)


def find_target_group(elb: Any, name: str) -> dict[str, Any] | None:
    """The target group named ``name`` with its ``Tags``, or None."""
    return _find(elb, _TARGET_GROUPS, name)


def _tagged(elb: Any, kind: _Kind, tag: str, value: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    with aws_errors(BackendError, f"{kind.what}s"):
        for page in elb.get_paginator(kind.describe).paginate():
            found.extend(page[kind.items])
    return [r for r in _with_tags(elb, found, kind.arn) if tags_of(r).get(tag) == value]


def tagged_balancers(elb: Any, tag: str, value: str) -> list[dict[str, Any]]:
    """Every balancer whose tag ``tag`` is ``value``, with its ``Tags``."""
    return _tagged(elb, _BALANCERS, tag, value)


def tagged_target_groups(elb: Any, tag: str, value: str) -> list[dict[str, Any]]:
    """Every target group whose tag ``tag`` is ``value``, with its ``Tags``."""
    return _tagged(elb, _TARGET_GROUPS, tag, value)


def delete_listener(elb: Any, arn: str) -> None:
    tolerating(["ListenerNotFound"], "the listener", elb.delete_listener, ListenerArn=arn)


def delete_balancer(elb: Any, arn: str, timeout: float = 300.0, sleep: Sleep = time.sleep) -> bool:
    """Delete its listeners, then the balancer, and wait until it is gone. True when it is."""
    listeners = tolerating(["LoadBalancerNotFound"], "the listeners", elb.describe_listeners,
                           LoadBalancerArn=arn)
    for listener in (listeners or {}).get("Listeners", []):
        delete_listener(elb, listener["ListenerArn"])
    tolerating(["LoadBalancerNotFound"], "the load balancer", elb.delete_load_balancer,
               LoadBalancerArn=arn)

    def gone() -> bool:
        found = tolerating(["LoadBalancerNotFound"], "the load balancer",
                           elb.describe_load_balancers, LoadBalancerArns=[arn])
        return not found or not found["LoadBalancers"]

    return wait_until(gone, Backoff(timeout, sleep=sleep))


def delete_target_group(elb: Any, arn: str, timeout: float = 120.0, sleep: Sleep = time.sleep) -> bool:
    """Delete it, retrying while a listener being deleted still uses it. True when it is gone."""
    with aws_errors(BackendError, "the target group"):
        return delete_when_free(functools.partial(elb.delete_target_group, TargetGroupArn=arn),
                                gone="TargetGroupNotFound", in_use="ResourceInUse",
                                backoff=Backoff(timeout, sleep=sleep))
