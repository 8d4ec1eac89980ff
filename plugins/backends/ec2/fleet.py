"""``--cloud ec2 --replicas N``: a fleet of replicas behind an Application Load Balancer.

The single-instance plan (store, instance type, AMI, VPC, token, wrapper, serve command) is
made first, exactly as for one instance; each replica runs its user data with ``--killafter 0``,
since the Auto Scaling group owns the replicas' lifetime. Then, each step undone in reverse order
if a later one fails (or on Ctrl-C):

    balancer security group (443 and --lb-port from --cidr) -> replicas' security group (--port
    from the balancer's group only, 22 from --cidr with --key-name) -> launch template -> target
    group (--port, health check /v2/health/ready) -> load balancer -> its certificate in ACM ->
    listeners (HTTPS 443 forwarding, --lb-port redirecting to it: ``fleet_tls.py``; with
    --no-tls one HTTP listener on --lb-port, forwarding) -> Auto Scaling group (default VPC's
    subnets, attached to the target group) -> scaling policy

Every part is named after the fleet and tagged ``studio-plug:fleet=NAME`` and
``studio-plug:managed=fleet`` — not ``=true``, so the single-server ``ls``/``stop`` code, which
acts on ``managed=true``, never mistakes a replica or a fleet's group for a lone server's.
This module makes the plan; ``fleet_create`` creates it, ``fleet_inventory`` finds fleets and
``fleet_teardown`` removes one in dependency order, tolerating parts already gone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from plugins.aws import aws_errors, client
from plugins.backends.ec2.autoscaling import find_launch_template, find_scaling_group, replica_subnets
from plugins.backends.ec2.balancer import find_balancer, find_target_group, fleet_subnets
from plugins.backends.ec2.firewall import MANAGED_TAG
from plugins.backends.ec2.fleet_options import FleetOptions, Sizes, generate_fleet_name, validate_fleet_name
from plugins.backends.ec2.fleet_tls import HTTPS_PORT, check_own_certificate
from plugins.backends.ec2.instances import SCHEME_TAG, tags_of
from plugins.backends.ec2.options import Ec2Options
from plugins.backends.ec2.plan import Plan, plan, with_shipment
from plugins.backends.ec2.spot import FLEET_DRAIN, fleet_types, spot_environment
from studio_plugins import BackendError, ConfigurationError, LaunchContext

FLEET_TAG = "studio-plug:fleet"
LB_PORT_TAG = "studio-plug:lb-port"
LB_SCHEME_TAG = "studio-plug:lb-scheme"
"""``https`` when the balancer serves HTTPS (``SCHEME_TAG`` is the replicas', behind it)."""
ROLE_TAG = "studio-plug:role"
FLEET = "fleet"
"""The ``studio-plug:managed`` value of a fleet's parts."""


@dataclass(frozen=True)
class Clients:
    ec2: Any
    elb: Any
    asg: Any
    ssm: Any = None
    """Parameter Store, where the fleet's token is."""
    acm: Any = None
    """Certificate Manager, where the balancer's certificate is."""

    @property
    def region(self) -> str:
        return str(self.ec2.meta.region_name)


def clients(region: str | None, ec2: Any = None) -> Clients:
    with aws_errors(BackendError, "EC2"):
        ec2 = ec2 or client("ec2", region)
        region = str(ec2.meta.region_name)
        return Clients(ec2, client("elbv2", region), client("autoscaling", region),
                       client("ssm", region), client("acm", region))


def ours(resource: dict[str, Any], name: str) -> bool:
    tags = tags_of(resource)
    return tags.get(FLEET_TAG) == name and tags.get(MANAGED_TAG) == FLEET


def balancer_url(dns_name: str, port: int, https: bool = False) -> str:
    """Where clients go: ``https://DNS/`` (443) when it serves HTTPS, else its HTTP port."""
    if https:
        return f"https://{dns_name}/"
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
    spot_types: list[str] = dataclasses.field(default_factory=list)
    """With ``--spot``: the instance types of the mixed-instances policy (``spot.py``)."""
    on_demand_base: int = 0
    tls: bool = True
    """Whether the balancer serves HTTPS (not with --no-tls)."""
    certificate_arn: str | None = None
    """``--certificate-arn``: the user's own certificate; None: ours is imported (``fleet_tls``)."""
    certificate_domain: str = ""


def security_group_names(name: str) -> list[str]:
    return [f"{name}-balancer", f"{name}-replicas"]


def name_taken(c: Clients, vpc_id: str, name: str) -> bool:
    """Whether anything a fleet called ``name`` would create already exists under that name."""
    if (find_scaling_group(c.asg, name) or find_balancer(c.elb, name)
            or find_target_group(c.elb, name) or find_launch_template(c.ec2, name)):
        return True
    with aws_errors(BackendError, "security groups"):
        groups = c.ec2.describe_security_groups(Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "group-name", "Values": security_group_names(name)},
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
    if options.grpc_port is not None:
        raise ConfigurationError(
            "a fleet's balancer forwards HTTP only, so its replicas' gRPC could not be reached; "
            "--grpc-port is for a single instance",
            hint="leave --grpc-port out (fleets are HTTP only for now), or serve gRPC from one "
            "instance: leave out the fleet's options")
    if options.certfile:
        raise ConfigurationError(
            "a fleet's replicas serve plain HTTP to its balancer; --certfile is for a single "
            "instance", hint="leave --certfile/--keyfile out: the balancer serves HTTPS with a "
            "certificate from your CA, or your own ACM one with --certificate-arn")
    tls = not Ec2Options.from_options(options).no_tls
    if fleet.certificate_arn and not tls:
        raise ConfigurationError("--no-tls and --certificate-arn contradict each other")
    if tls and fleet.port == HTTPS_PORT:
        raise ConfigurationError(
            f"--lb-port {HTTPS_PORT} is the HTTPS listener's; --lb-port is the HTTP one that "
            "redirects to it", hint="leave --lb-port out (80), or add --no-tls for HTTP on 443")
    base = plan(context)
    # the replicas serve HTTP inside the VPC (the balancer's target group checks them so)
    base = dataclasses.replace(base, served=dataclasses.replace(base.served, killafter=0.0),
                               tls=False)
    settings = base.ec2_options
    if settings.spot:  # a replica answers not-ready first, so the balancer takes it out
        base = dataclasses.replace(base, environment=spot_environment(drain=FLEET_DRAIN))
    c = clients(base.region, base.ec2)
    domain = (check_own_certificate(c.acm, fleet.certificate_arn, base.region)
              if fleet.certificate_arn else "")
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
        LB_SCHEME_TAG: "https" if tls else "http",
        SCHEME_TAG: "http",  # the replicas behind the balancer
    }
    base = dataclasses.replace(base, parameter_tags=tags)  # the token's: the fleet's
    types = (fleet_types(base.ec2, base.instance_type, chosen=bool(settings.instance_type))
             if settings.spot else [])
    base = with_shipment(base)  # the last step: nothing can refuse the launch after it
    return FleetPlan(base, c, name, sizes, fleet.target_rps, fleet.port, subnets, replicas_in, tags,
                     types, fleet.on_demand_base or 0, tls=tls,
                     certificate_arn=fleet.certificate_arn.strip() if fleet.certificate_arn else None,
                     certificate_domain=domain)
