"""``--spot``: serve from EC2 spot capacity, which costs a fraction of on-demand but may be taken
back with two minutes' notice.

A single instance is launched as a one-time spot request that terminates on interruption
(``market_options``); a fleet's Auto Scaling group gets a mixed-instances policy
(``mixed_instances_policy``): ``--on-demand-base N`` on-demand replicas, the rest spot, across
the instance types of the same size that ``machine.py`` lists, with capacity rebalancing on
(the group starts a replacement when AWS warns that a spot instance is at risk, before it is
taken). ``--bid`` caps the hourly price (default: the on-demand price). ``--cloud ec2spot`` is
``--cloud ec2 --spot``.

On the instance, ``spot_watch.py`` turns the interruption notice into a graceful shutdown: the
user data sets ``spot_environment`` for it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plugins.aws import aws_errors
from plugins.backends.ec2.machine import same_size_types
from plugins.backends.ec2.spot_watch import DRAIN_ENV, WATCH_ENV
from studio_plugins import BackendError, ConfigurationError, LaunchContext, ServeOptions

if TYPE_CHECKING:
    from plugins.backends.ec2.options import Ec2Options

FLEET_DRAIN = 50.0
"""Seconds a fleet's replica stays up answering not-ready after the notice: the balancer's
health check (every 15 s, 3 failures: balancer.py) takes it out of rotation first, well inside
the two minutes; what is in flight then has the rest."""
ALLOCATION = "price-capacity-optimized"
"""AWS's recommended spot allocation: the pools least likely to be interrupted, at a low price."""


def check(settings: Ec2Options, *, fleet: bool, on_demand_base: int | None) -> None:
    """The spot flags that make no sense together are errors that say what to pass."""
    if settings.bid is not None and not math.isfinite(settings.bid):  # click lets nan through
        raise ConfigurationError(f"--bid {settings.bid} is not a price", hint="e.g. --bid 0.35")
    if settings.bid is not None and not settings.spot:
        raise ConfigurationError("--bid is the most you pay for spot capacity",
                                 hint="add --spot (or use --cloud ec2spot)")
    if on_demand_base is not None and not (settings.spot and fleet):
        raise ConfigurationError(
            "--on-demand-base is the number of on-demand replicas of a spot fleet",
            hint="add --spot and --replicas N (or --min-replicas/--max-replicas)",
        )


def price(bid: float) -> str:
    """``--bid`` as the string AWS takes (USD per hour)."""
    return f"{bid:.5f}".rstrip("0").rstrip(".")


def market_options(settings: Ec2Options) -> dict[str, Any]:
    """``RunInstances``' ``InstanceMarketOptions`` for a one-time spot instance that is
    terminated when interrupted (a stopped server would still hold its disk, and billing)."""
    spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
    if settings.bid is not None:
        spot["MaxPrice"] = price(settings.bid)
    return {"MarketType": "spot", "SpotOptions": spot}


def spot_environment(drain: float) -> dict[str, str]:
    """What the user data exports so that the server watches for the interruption notice and,
    on it, answers not-ready for ``drain`` seconds before it stops accepting."""
    return {WATCH_ENV: "1", DRAIN_ENV: f"{drain:g}"}


def fleet_types(ec2: Any, instance_type: str, chosen: bool) -> list[str]:
    """The group's instance types: ``instance_type`` first, then (unless the user named it with
    --instance-type) the others of its size from the machine table that the region offers.
    More types mean more spot pools, so fewer interruptions and less waiting for capacity."""
    alternatives = [] if chosen else [t for t in same_size_types(instance_type) if t != instance_type]
    if not alternatives:
        return [instance_type]
    with aws_errors(BackendError, "which instance types the region offers"):
        offered = {o["InstanceType"] for o in ec2.describe_instance_type_offerings(
            LocationType="region",
            Filters=[{"Name": "instance-type", "Values": alternatives}],
        )["InstanceTypeOfferings"]}
    return [instance_type, *(t for t in alternatives if t in offered)]


def mixed_instances_policy(
    template_id: str, types: list[str], on_demand_base: int, bid: float | None
) -> dict[str, Any]:
    """The Auto Scaling group's ``MixedInstancesPolicy``: ``on_demand_base`` on-demand
    replicas, every one above it spot, any of ``types``."""
    distribution: dict[str, Any] = {
        "OnDemandBaseCapacity": on_demand_base,
        "OnDemandPercentageAboveBaseCapacity": 0,
        "SpotAllocationStrategy": ALLOCATION,
    }
    if bid is not None:
        distribution["SpotMaxPrice"] = price(bid)
    return {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": {"LaunchTemplateId": template_id, "Version": "$Latest"},
            "Overrides": [{"InstanceType": t} for t in types],
        },
        "InstancesDistribution": distribution,
    }


@dataclass
class SpotContext:
    """The launch context with ``--spot`` set: what ``--cloud ec2spot`` hands the ec2 backend."""

    context: LaunchContext
    options: ServeOptions

    def serve_here(self) -> int:
        return self.context.serve_here()

    def serve_argv(self, options: ServeOptions | None = None) -> list[str]:
        return self.context.serve_argv(options or self.options)


def with_spot(context: LaunchContext) -> SpotContext:
    options = context.options
    return SpotContext(context, dataclasses.replace(
        options, backend_options={**options.backend_options, "spot": True}))

