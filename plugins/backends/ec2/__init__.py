"""The ``ec2`` backend: ``--cloud ec2`` serves on a new EC2 instance, or with ``--replicas`` on a
fleet of them behind a load balancer.

This module is the plugin (the name ``backends.ec2`` in listings and ``STUDIO_PLUGINS_DISABLE``);
the work is in its modules: ``plan`` (checks before anything is created, and the undo both
paths share), ``single`` and ``fleet``/``fleet_create`` (creating), ``inventory`` and
``fleet_inventory``/``fleet_teardown`` (``ls``/``stop``), ``options``/``fleet_options`` (the
``serve`` flags, each declared once with ``flags``), ``backoff`` (waiting on AWS), and one module
per kind of AWS resource (``instances``, ``firewall``, ``balancer``, ``autoscaling``,
``machine``, ``userdata``, ``parameters``: the token and TLS key in Parameter Store, which the
instance reads with ``boot``; ``fleet_tls``: a balancer's certificate in ACM and its HTTPS
listener); ``spot`` and ``spot_watch`` are ``--spot``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from plugins.backends.ec2 import spot, spot_watch
from plugins.backends.ec2.fleet import plan_fleet
from plugins.backends.ec2.fleet_create import execute_fleet
from plugins.backends.ec2.fleet_options import FleetOptions
from plugins.backends.ec2.options import Ec2Options
from plugins.backends.ec2.plan import plan as plan_single
from plugins.backends.ec2.plan import with_shipment
from plugins.backends.ec2.single import execute
from studio_plugins import Backend, LaunchContext, ServeOptions, hookimpl

if TYPE_CHECKING:
    import click


class Ec2Backend(Backend):
    name = "ec2"
    help = ("a new EC2 instance running the same serve command, or with --replicas a fleet of "
            "them behind a load balancer (needs an s3:// store)")

    def cli_options(self) -> Sequence[click.Option]:
        return [*Ec2Options.cli_options(), *FleetOptions.cli_options()]

    def launch(self, context: LaunchContext) -> int:
        fleet = FleetOptions.from_options(context.options)
        fleet.refuse_without_fleet()
        spot.check(Ec2Options.from_options(context.options), fleet=fleet.wanted,
                   on_demand_base=fleet.on_demand_base)
        if fleet.wanted:  # --replicas / --min-replicas / --max-replicas
            return execute_fleet(plan_fleet(context))
        return execute(with_shipment(plan_single(context)))


class Ec2SpotBackend(Ec2Backend):
    """``--cloud ec2spot``: ``--cloud ec2 --spot`` (the name ``studio run`` had); its options
    are ec2's, declared once there."""

    name = "ec2spot"
    help = "as ec2, on spot capacity (--cloud ec2 --spot)"

    def cli_options(self) -> Sequence[click.Option]:
        return []

    def launch(self, context: LaunchContext) -> int:
        return super().launch(spot.with_spot(context))


@hookimpl
def studio_register_backends(register: Callable[[Backend], None]) -> None:
    register(Ec2Backend())
    register(Ec2SpotBackend())


@hookimpl
def studio_watch_shutdown(options: ServeOptions, request_shutdown: Callable[[str, float], None]) -> None:
    """On a spot instance, leave gracefully on the interruption notice (``spot_watch.py``)."""
    spot_watch.start(request_shutdown)
