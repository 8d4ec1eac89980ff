"""The ``serve`` options that make ``--cloud ec2`` start a fleet, and the fleet's name.

A fleet is asked for with ``--replicas N`` (a fixed size) or ``--min-replicas A --max-replicas B
--target-rps R`` (scaled on requests per instance). Every AWS resource of a fleet is named after
it, so the name must suit the strictest of them: a load balancer or target group name (1-32
letters, digits and hyphens, no hyphen at either end) and a launch template name (3 or more).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from plugins.backends.ec2.flags import Flags, flag
from studio_plugins import ConfigurationError

DEFAULT_LB_PORT = 80
_NAME = re.compile(r"[a-z][a-z0-9-]{1,30}[a-z0-9]")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
_ADJECTIVES = ("amber", "brisk", "calm", "clever", "eager", "fresh", "gentle", "keen", "lucid",
               "merry", "nimble", "proud", "quiet", "rapid", "steady", "vivid")
_ANIMALS = ("badger", "crane", "dingo", "egret", "falcon", "gecko", "heron", "ibis", "koala",
            "lynx", "marten", "otter", "panda", "quail", "raven", "tapir")


def looks_like_instance_id(text: str) -> bool:
    return bool(_INSTANCE_ID.fullmatch(text))


def validate_fleet_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.startswith("internal-") or looks_like_instance_id(name):
        raise ConfigurationError(
            f"--fleet-name {name!r} cannot name a load balancer",
            hint="use 3-32 lower-case letters, digits and hyphens, starting with a letter and "
            "not ending with a hyphen (e.g. mnist-prod)",
        )
    return name


def generate_fleet_name(key: str, taken: Callable[[str], bool], attempts: int = 20) -> str:
    """``KEY-adjective-animal`` (the key shortened to a name-safe slug), one not ``taken``."""
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:14].rstrip("-")
    if not slug or not slug[0].isalpha():
        slug = ("fleet-" + slug)[:14].rstrip("-")
    for attempt in range(attempts):
        words = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_ANIMALS)}"
        name = f"{slug}-{words}" if attempt < attempts // 2 else f"{slug}-{secrets.token_hex(3)}"
        if not taken(name):
            return validate_fleet_name(name)
    raise ConfigurationError(f"no free fleet name found for {key!r}", hint="pass --fleet-name NAME")


@dataclass(frozen=True)
class Sizes:
    minimum: int
    desired: int
    maximum: int

    @property
    def scales(self) -> bool:
        return self.minimum < self.maximum


@dataclass(frozen=True)
class FleetOptions(Flags):
    """The fleet's ``serve`` options (``ServeOptions.backend_options``)."""

    replicas: int | None = flag(
        None, "[ec2 fleet] Serve from N instances behind an Application Load Balancer (an Auto "
        "Scaling group of this size).", click_type=lambda click: click.IntRange(min=1))
    min_replicas: int | None = flag(
        None, "[ec2 fleet] Fewest instances of a scaling fleet (default 1); an idle fleet scales "
        "in to this many.", click_type=lambda click: click.IntRange(min=1))
    max_replicas: int | None = flag(
        None, "[ec2 fleet] Most instances of a scaling fleet.",
        click_type=lambda click: click.IntRange(min=1))
    target_rps: float | None = flag(
        None, "[ec2 fleet] Requests per second per instance that the group keeps to by adding or "
        "removing instances (target tracking on the balancer's request count per target).",
        click_type=lambda click: click.FloatRange(min=0, min_open=True))
    lb_port: int | None = flag(
        None, f"[ec2 fleet] Port of the load balancer's HTTP listener (default {DEFAULT_LB_PORT}): "
        "it redirects to HTTPS on 443, or with --no-tls forwards to --port on the instances.",
        click_type=lambda click: click.IntRange(1, 65535))
    on_demand_base: int | None = flag(
        None, "[ec2 fleet] With --spot: this many replicas on-demand, the rest spot (default 0).",
        click_type=lambda click: click.IntRange(min=0))
    certificate_arn: str | None = flag(
        None, "[ec2 fleet] Your own ACM certificate (same region) for the balancer's HTTPS "
        "listener; default: one for the balancer's DNS name signed by your CA, imported into ACM.")
    fleet_name: str | None = flag(
        None, "[ec2 fleet] Name of the fleet and of each of its AWS resources; default: "
        "KEY-adjective-animal. `studio-plug stop NAME` removes it.")

    @property
    def wanted(self) -> bool:
        """Whether a fleet (not a single instance) was asked for."""
        return any(v is not None for v in (self.replicas, self.min_replicas, self.max_replicas))

    @property
    def port(self) -> int:
        return self.lb_port or DEFAULT_LB_PORT

    def refuse_without_fleet(self) -> None:
        given = [flag for flag, value in (("--target-rps", self.target_rps),
                                          ("--lb-port", self.lb_port),
                                          ("--certificate-arn", self.certificate_arn),
                                          ("--fleet-name", self.fleet_name)) if value is not None]
        if given and not self.wanted:
            raise ConfigurationError(
                f"{', '.join(given)} only applies to a fleet",
                hint="add --replicas N, or --min-replicas A --max-replicas B --target-rps R",
            )

    def sizes(self) -> Sizes:
        """(min, desired, max) as asked; contradictions are errors that say what to pass."""
        if self.replicas is not None:
            if self.min_replicas is not None or self.max_replicas is not None:
                raise ConfigurationError(
                    "--replicas fixes the size; --min-replicas/--max-replicas let it scale",
                    hint="pass one or the other",
                )
            if self.target_rps is not None:
                raise ConfigurationError(
                    "--target-rps needs room to scale, and --replicas fixes the size",
                    hint=f"e.g. --min-replicas 1 --max-replicas {max(2, self.replicas)} "
                    f"--target-rps {self.target_rps:g}",
                )
            return Sizes(self.replicas, self.replicas, self.replicas)
        if self.max_replicas is None:
            raise ConfigurationError("--min-replicas needs --max-replicas",
                                     hint="e.g. --min-replicas 1 --max-replicas 4 --target-rps 50")
        minimum = self.min_replicas if self.min_replicas is not None else 1
        if minimum > self.max_replicas:
            raise ConfigurationError(
                f"--min-replicas {minimum} is more than --max-replicas {self.max_replicas}"
            )
        if minimum < self.max_replicas and self.target_rps is None:
            raise ConfigurationError(
                "nothing would scale the fleet between --min-replicas and --max-replicas",
                hint="add --target-rps R (requests per second per instance), or use --replicas N",
            )
        return Sizes(minimum, minimum, self.max_replicas)
