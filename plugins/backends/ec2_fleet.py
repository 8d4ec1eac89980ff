"""``--cloud ec2 --replicas N``: a fleet of replicas behind an Application Load Balancer.

The single-instance plan (store, instance type, AMI, VPC, token, wrapper, serve command) is
made first, exactly as for one instance; each replica runs its user data with ``--killafter 0``,
since the Auto Scaling group owns the replicas' lifetime. Then, each step undone in reverse order
if a later one fails (or on Ctrl-C):

    balancer security group (--lb-port from --cidr) -> replicas' security group (--port from the
    balancer's group only, 22 from --cidr with --key-name) -> launch template -> target group
    (--port, health check /v2/health/ready) -> load balancer -> listener (--lb-port, forward) ->
    Auto Scaling group (default VPC's subnets, attached to the target group) -> scaling policy

Every part is named after the fleet and tagged ``studio-plug:fleet=NAME`` and
``studio-plug:managed=fleet`` — not ``=true``, so the single-server ``ls``/``stop`` code, which
acts on ``managed=true``, never mistakes a replica or a fleet's group for a lone server's.
``stop_fleet`` removes a fleet in dependency order and tolerates parts already gone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from plugins.aws import aws_errors, client
from plugins.backends.ec2 import Plan, Undo, plan, say
from plugins.backends.ec2_autoscaling import (
    create_launch_template,
    create_scaling_group,
    delete_launch_template,
    delete_policies,
    delete_scaling_group,
    find_launch_template,
    find_scaling_group,
    in_service,
    put_request_policy,
    replica_subnets,
    tagged_launch_templates,
    tagged_scaling_groups,
    wait_in_service,
)
from plugins.backends.ec2_balancer import (
    HEALTH_PATH,
    create_balancer,
    create_listener,
    create_target_group,
    delete_balancer,
    delete_listener,
    delete_target_group,
    elb_tags,
    find_balancer,
    find_target_group,
    fleet_subnets,
    resource_label,
    tagged_balancers,
    wait_active,
)
from plugins.backends.ec2_firewall import MANAGED_TAG, delete_group, normalise_cidr
from plugins.backends.ec2_fleet_options import (
    FleetOptions,
    Sizes,
    generate_fleet_name,
    validate_fleet_name,
)
from plugins.backends.ec2_instances import KEY_TAG, STARTED_BY_TAG, tag_list, tags_of, wait_ready
from plugins.backends.ec2_options import Ec2Options
from studio_plugins import BackendError, ConfigurationError, LaunchContext

FLEET_TAG = "studio-plug:fleet"
LB_PORT_TAG = "studio-plug:lb-port"
ROLE_TAG = "studio-plug:role"
FLEET = "fleet"
"""The ``studio-plug:managed`` value of a fleet's parts."""


@dataclass(frozen=True)
class Clients:
    ec2: Any
    elb: Any
    asg: Any

    @property
    def region(self) -> str:
        return str(self.ec2.meta.region_name)


def clients(region: str | None, ec2: Any = None) -> Clients:
    with aws_errors(BackendError, "EC2"):
        ec2 = ec2 or client("ec2", region)
        region = str(ec2.meta.region_name)
        return Clients(ec2, client("elbv2", region), client("autoscaling", region))


def ours(resource: dict[str, Any], name: str) -> bool:
    tags = tags_of(resource)
    return tags.get(FLEET_TAG) == name and tags.get(MANAGED_TAG) == FLEET


def balancer_url(dns_name: str, port: int) -> str:
    return f"http://{dns_name}/" if port == 80 else f"http://{dns_name}:{port}/"


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class FleetPlan:
    base: Plan
    """The single-instance plan; its serve command already says ``--killafter 0``."""
    clients: Clients
    name: str
    sizes: Sizes
    target_rps: float | None
    lb_port: int
    subnets: list[str]
    """The balancer's: the default subnet of every zone."""
    replica_subnets: list[str]
    """The group's: those where the instance type is offered."""
    tags: dict[str, str]


def _security_group_names(name: str) -> list[str]:
    return [f"{name}-balancer", f"{name}-replicas"]


def name_taken(c: Clients, vpc_id: str, name: str) -> bool:
    """Whether anything a fleet called ``name`` would create already exists under that name."""
    if (find_scaling_group(c.asg, name) or find_balancer(c.elb, name)
            or find_target_group(c.elb, name) or find_launch_template(c.ec2, name)):
        return True
    with aws_errors(BackendError, "security groups"):
        groups = c.ec2.describe_security_groups(Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "group-name", "Values": _security_group_names(name)},
        ])["SecurityGroups"]
    return bool(groups)


def plan_fleet(context: LaunchContext) -> FleetPlan:
    options = context.options
    fleet = FleetOptions.from_options(options)
    sizes = fleet.sizes()
    if Ec2Options.from_options(options).subnet_id:
        raise ConfigurationError(
            "a fleet spans the default VPC's subnets; --subnet-id is for a single instance",
            hint="leave --subnet-id out (the region needs a default VPC)",
        )
    if fleet.fleet_name:
        validate_fleet_name(fleet.fleet_name)
    base = plan(context)
    base = dataclasses.replace(base, served=dataclasses.replace(base.served, killafter=0.0))
    c = clients(base.region, base.ec2)
    by_zone = fleet_subnets(base.ec2, base.vpc_id)
    subnets = [by_zone[zone] for zone in sorted(by_zone)]
    replicas_in = replica_subnets(base.ec2, base.instance_type, by_zone)
    if fleet.fleet_name:
        name = fleet.fleet_name
        if name_taken(c, base.vpc_id, name):
            raise ConfigurationError(
                f"something named {name!r} exists already (a fleet, or what is left of one)",
                hint=f"pick another --fleet-name, or remove it: `studio-plug stop {name}`",
            )
    else:
        name = generate_fleet_name(options.keys[0], lambda n: name_taken(c, base.vpc_id, n))
    tags = {
        **base.tags,
        "Name": f"studio-plug {name}",
        MANAGED_TAG: FLEET,
        FLEET_TAG: name,
        LB_PORT_TAG: str(fleet.port),
    }
    return FleetPlan(base, c, name, sizes, fleet.target_rps, fleet.port, subnets, replicas_in, tags)


# --- creating, with undo ------------------------------------------------------------------------


def create_security_group(
    ec2: Any, vpc_id: str, name: str, role: str, permissions: list[dict[str, Any]],
    tags: dict[str, str],
) -> str:
    all_tags = {**tags, "Name": name, ROLE_TAG: role}
    with aws_errors(BackendError, f"security group {name}"):
        group_id = str(ec2.create_security_group(
            GroupName=name, Description=f"studio-plug fleet {tags[FLEET_TAG]}: {role}",
            VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(all_tags)}],
        )["GroupId"])
    try:
        with aws_errors(BackendError, f"security group {group_id}"):
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=permissions)
    except BaseException:
        delete_group(ec2, group_id, timeout=0)
        raise
    return group_id


def from_cidr(port: int, cidr: str, description: str) -> dict[str, Any]:
    cidr = normalise_cidr(cidr)
    ranges = ({"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": description}]} if ":" in cidr
              else {"IpRanges": [{"CidrIp": cidr, "Description": description}]})
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges}


def from_group(port: int, group_id: str, description: str) -> dict[str, Any]:
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
            "UserIdGroupPairs": [{"GroupId": group_id, "Description": description}]}


def execute_fleet(fp: FleetPlan) -> int:
    base, c, name = fp.base, fp.clients, fp.name
    o, s = base.options, base.ec2_options
    if not s.iam_profile:
        say(f"note: without --iam-profile the replicas need another way to read {base.store.url}")
    if base.token is None:
        say(f"warning: --no-auth: anyone who can reach port {fp.lb_port} from {s.cidr} may use "
            "the model")
    deadline = time.monotonic() + s.launch_timeout
    undo = Undo()
    with undo.on_failure():
        for local, key in base.wrapper_uploads:
            base.store.upload(local, key)
            undo.push(f"deleting s3://{base.store.location.bucket}/{key}",
                      functools.partial(base.store.delete, key))
        balancer_group, replica_group = _security_group_names(name)
        lb_group = create_security_group(
            c.ec2, base.vpc_id, balancer_group, "balancer",
            [from_cidr(fp.lb_port, s.cidr, "studio-plug fleet")], fp.tags)
        undo.push(f"deleting security group {lb_group}", lambda: delete_group(c.ec2, lb_group))
        say(f"security group {lb_group} (balancer): TCP {fp.lb_port} from {normalise_cidr(s.cidr)}")
        permissions = [from_group(o.port, lb_group, "studio-plug balancer")]
        if s.key_name:
            permissions.append(from_cidr(22, s.cidr, "ssh"))
        sg = create_security_group(c.ec2, base.vpc_id, replica_group, "replicas", permissions, fp.tags)
        undo.push(f"deleting security group {sg}", lambda: delete_group(c.ec2, sg))
        say(f"security group {sg} (replicas): TCP {o.port} from the balancer's group only"
            + (f", 22 from {normalise_cidr(s.cidr)}" if s.key_name else ""))

        template = create_launch_template(
            c.ec2, name, image_id=base.image.image_id, instance_type=base.instance_type,
            user_data=base.user_data().render(), group_id=sg, key_name=s.key_name,
            iam_profile=s.iam_profile, tags=fp.tags)
        undo.push(f"deleting launch template {template}",
                  lambda: delete_launch_template(c.ec2, template))
        say(f"launch template {template} ({base.instance_type}, {base.image.image_id} "
            f"{base.image.name})")
        target_group = create_target_group(c.elb, name, base.vpc_id, o.port, fp.tags)
        undo.push(f"deleting target group {name}", lambda: delete_target_group(c.elb, target_group))
        say(f"target group {name}: HTTP {o.port}, health check {HEALTH_PATH}")
        balancer = create_balancer(c.elb, name, fp.subnets, lb_group, fp.tags)
        undo.push(f"deleting load balancer {name}", lambda: delete_balancer(c.elb, balancer.arn))
        say(f"load balancer {name}: {balancer.dns_name} in {len(fp.subnets)} availability zones")
        listener = create_listener(c.elb, balancer.arn, fp.lb_port, target_group, fp.tags)
        undo.push(f"deleting listener on port {fp.lb_port}", lambda: delete_listener(c.elb, listener))

        create_scaling_group(
            c.asg, name, template_id=template, subnets=fp.replica_subnets, sizes=fp.sizes,
            target_group_arn=target_group, grace=s.launch_timeout, tags=fp.tags)
        undo.push(f"deleting auto scaling group {name} and its instances",
                  lambda: delete_scaling_group(c.asg, c.ec2, name))
        sizes = fp.sizes
        say(f"auto scaling group {name}: {sizes.desired} x {base.instance_type} in "
            f"{len(fp.replica_subnets)} zones" + (f", scaling {sizes.minimum}-{sizes.maximum}"
                                                  if sizes.scales else ""))
        if fp.target_rps is not None:
            policy = put_request_policy(c.asg, name, resource_label(balancer.arn, target_group),
                                        fp.target_rps)
            undo.push(f"deleting scaling policy {policy}", lambda: delete_policies(c.asg, name))
            say(f"scaling policy {policy}: {fp.target_rps:g} requests/s per instance "
                f"({fp.target_rps * 60:g} per minute, as the metric counts)")

        say(f"waiting for the balancer and {sizes.desired} instance(s) "
            f"(at most {s.launch_timeout:g} s)")
        wait_active(c.elb, balancer.arn, max(deadline - time.monotonic(), 1.0))
        wait_in_service(c.asg, name, sizes.desired, max(deadline - time.monotonic(), 1.0))
        url = balancer_url(balancer.dns_name, fp.lb_port)
        if s.wait_ready:
            say(f"waiting for {url}v2/health/ready (installing takes a few minutes)")
            wait_ready(url, max(deadline - time.monotonic(), 1.0))
    print(url, flush=True)
    print(f"fleet: {name} ({sizes.desired} x {base.instance_type} in {base.region}"
          + (f", {sizes.minimum}-{sizes.maximum} at {fp.target_rps:g} req/s each" if sizes.scales
             else "") + ")", flush=True)
    if base.token:
        print(f"token: {base.token}", flush=True)
    say(f"the fleet bills (instances and the load balancer) until you stop it: "
        f"`studio-plug stop {name} --region {base.region}`")
    return 0


# --- listing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    name: str
    key: str
    desired: int | None
    in_service: int | None
    url: str
    created: datetime
    started_by: str


def _tagged_target_groups(elb: Any) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    with aws_errors(BackendError, "target groups"):
        for page in elb.get_paginator("describe_target_groups").paginate():
            groups.extend(page["TargetGroups"])
    tags = elb_tags(elb, [g["TargetGroupArn"] for g in groups])
    return [{**g, "Tags": tag_list(tags.get(g["TargetGroupArn"], {}))} for g in groups
            if tags.get(g["TargetGroupArn"], {}).get(MANAGED_TAG) == FLEET]


def _tagged_security_groups(ec2: Any, name: str | None = None) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{MANAGED_TAG}", "Values": [FLEET]}]
    if name:
        filters.append({"Name": f"tag:{FLEET_TAG}", "Values": [name]})
    with aws_errors(BackendError, "security groups"):
        return list(ec2.describe_security_groups(Filters=filters)["SecurityGroups"])


def fleets(c: Clients) -> list[Fleet]:
    """Every fleet with any part left, oldest first; parts that are gone show as ``-``."""
    groups = {tags_of(g).get(FLEET_TAG, ""): g for g in tagged_scaling_groups(c.asg, MANAGED_TAG, FLEET)}
    balancers = {tags_of(b).get(FLEET_TAG, ""): b for b in tagged_balancers(c.elb, MANAGED_TAG, FLEET)}
    others = {tags_of(r).get(FLEET_TAG, ""): r for r in [
        *tagged_launch_templates(c.ec2, MANAGED_TAG, FLEET), *_tagged_target_groups(c.elb),
        *_tagged_security_groups(c.ec2)]}
    found = []
    for name in sorted((set(groups) | set(balancers) | set(others)) - {""}):
        group, balancer = groups.get(name), balancers.get(name)
        tags = tags_of(group or balancer or others[name])
        url = "-"
        if balancer:
            port = int(tags_of(balancer).get(LB_PORT_TAG, "80"))
            url = balancer_url(balancer["DNSName"], port)
        created = ((group or {}).get("CreatedTime") or (balancer or {}).get("CreatedTime")
                   or others.get(name, {}).get("CreateTime") or datetime.now(UTC))
        found.append(Fleet(
            name=name, key=tags.get(KEY_TAG, "?"),
            desired=int(group["DesiredCapacity"]) if group else None,
            in_service=in_service(group) if group else None,
            url=url, created=created, started_by=tags.get(STARTED_BY_TAG, "?"),
        ))
    return sorted(found, key=lambda f: (f.created, f.name))


# --- stopping ---------------------------------------------------------------------------------


@dataclass
class Stopped:
    """What ``stop_fleet`` did: ``removed`` and ``left`` (with why) are lines to show."""

    removed: list[str] = dataclasses.field(default_factory=list)
    left: list[str] = dataclasses.field(default_factory=list)
    foreign: list[str] = dataclasses.field(default_factory=list)
    """Things named like the fleet that are not ours: left alone."""


def stop_fleet(c: Clients, name: str, timeout: float = 300.0,
               progress: Callable[[str], None] = say) -> Stopped:
    """Remove fleet ``name`` in dependency order: the group with its instances, the listener
    and the balancer, the target group, the launch template, then the security groups (the
    replicas' first: its rule names the balancer's). Parts already gone are skipped, so this
    can run again after a partial failure."""
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
    remove("target group", lambda: find_target_group(c.elb, name),
           lambda t: f"target group {name}",
           lambda t: delete_target_group(c.elb, t["TargetGroupArn"], timeout))
    remove("launch template", lambda: find_launch_template(c.ec2, name),
           lambda t: f"launch template {t['LaunchTemplateId']}",
           lambda t: delete_launch_template(c.ec2, t["LaunchTemplateId"]))
    groups = _tagged_security_groups(c.ec2, name)
    for sg in sorted(groups, key=lambda g: tags_of(g).get(ROLE_TAG) != "replicas"):
        step(f"security group {sg['GroupId']} ({tags_of(sg).get(ROLE_TAG, '?')})",
             functools.partial(delete_group, c.ec2, sg["GroupId"], timeout))
    return done


def fleet_names(c: Clients) -> list[str]:
    return [f.name for f in fleets(c)]
