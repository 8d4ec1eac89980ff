"""``--cloud ec2``: serve on a new EC2 instance that runs the same ``studio-plug serve`` command.

Everything that can be checked without creating anything is checked first (store, experiment,
instance type, AMI, VPC). Then the wrapper is uploaded, the security group found or created and
the instance started; if anything fails from there on (or Ctrl-C), what this command created is
removed again, newest first. On success it prints the URL, the instance id and the token and
exits 0; the instance terminates itself once ``serve`` exits (``--killafter``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from plugins.aws import aws_errors, client
from plugins.backends.ec2_firewall import MANAGED_TAG, delete_group, ensure_group, vpc_for, wanted_rules
from plugins.backends.ec2_fleet_options import FleetOptions
from plugins.backends.ec2_fleet_options import cli_options as fleet_cli_options
from plugins.backends.ec2_instances import (
    KEY_TAG,
    PORT_TAG,
    STARTED_BY_TAG,
    STORE_TAG,
    started_by,
    tag_list,
    terminate,
    wait_for_address,
    wait_ready,
)
from plugins.backends.ec2_machine import (
    Image,
    check_ami,
    describe_type,
    find_ami,
    instance_type_for,
)
from plugins.backends.ec2_options import Ec2Options, cli_options
from plugins.backends.ec2_userdata import VENV, UserData, WrapperFetch, default_install_spec
from plugins.stores.s3 import S3Store, parse_s3_url
from studio_plugins import (
    Backend,
    BackendError,
    ConfigurationError,
    ExperimentError,
    LaunchContext,
    ServeOptions,
    hookimpl,
    serve_argv,
    studio_home,
)

if TYPE_CHECKING:
    import click

log = logging.getLogger("studio_plugins.ec2")



# --- checks before anything is created --------------------------------------------------------


def _local_store_hint(options: ServeOptions) -> str:
    key = options.keys[0]
    root = studio_home()
    url = options.store_url
    if url and urlparse(url).scheme in ("", "file"):
        root = Path(urlparse(url).path if url.startswith("file:") else url).expanduser()
    source = root / "experiments" / key / "modeldir"
    return (f"push it to S3 first: `studio-plug experiments push {key} {source} --store "
            "s3://BUCKET/PREFIX`, then serve with --store s3://BUCKET/PREFIX")


def s3_store(options: ServeOptions) -> S3Store:
    url = options.store_url
    if not url or urlparse(url).scheme != "s3":
        where = url or "the embedded store"
        raise ConfigurationError(
            f"--cloud ec2 needs a store the instance can reach; {where} is on this machine",
            hint=_local_store_hint(options),
        )
    store = S3Store(parse_s3_url(url))
    for key in options.keys:
        if not store.exists(key):
            raise ExperimentError(
                f"no experiment {key!r} in {store.url}",
                hint=f"push it: `studio-plug experiments push {key} DIR --store {store.url}`",
            )
    return store


def _s3_endpoint_for_instance() -> dict[str, str]:
    """A custom S3 endpoint (S3-compatible storage) travels to the instance unless it is this
    machine's loopback, which the instance could not reach."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    host = urlparse(endpoint).hostname or ""
    with contextlib.suppress(ValueError):
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            log.warning("not passing the S3 endpoint %s to the instance: it is this machine", endpoint)
            return {}
    return {"AWS_ENDPOINT_URL_S3": endpoint}


@dataclass
class Plan:
    """What will be created, decided before anything is."""

    options: ServeOptions
    ec2_options: Ec2Options
    store: S3Store
    ec2: Any
    region: str
    instance_type: str
    image: Image
    vpc_id: str
    token: str | None
    served: ServeOptions
    """The options the instance serves with (``dataclasses.replace`` of ``options``)."""
    wrapper_uploads: list[tuple[Path, str]] = field(default_factory=list)
    """(local file, object key) to upload before starting."""
    wrapper_fetches: list[WrapperFetch] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def user_data(self) -> UserData:
        environment = {"AWS_DEFAULT_REGION": self.region, **_s3_endpoint_for_instance()}
        if self.token:
            environment["STUDIO_TOKEN"] = self.token
        return UserData(
            serve_argv=serve_argv(self.served),
            environment=environment,
            install=self.ec2_options.install or default_install_spec(),
            cpu_only=self.options.gpus == 0 and not self.instance_type.startswith(("g", "p")),
            wrappers=tuple(self.wrapper_fetches),
        )


def plan(context: LaunchContext) -> Plan:
    options = context.options
    settings = Ec2Options.from_options(options)
    if options.port == 0:
        raise ConfigurationError(
            "--cloud ec2 needs a fixed --port to open in the firewall", hint="e.g. --port 5000"
        )
    if settings.no_auth and options.token:
        raise ConfigurationError("--no-auth and --token contradict each other")
    wanted_rules(options.port, settings.cidr, False)  # validates --cidr early
    store = s3_store(options)

    with aws_errors(BackendError, "EC2"):
        ec2 = client("ec2", settings.region)
    region = str(ec2.meta.region_name)
    instance_type = settings.instance_type or instance_type_for(options.gpus)
    architecture, type_gpus = describe_type(ec2, instance_type, region)
    if type_gpus < options.gpus:
        raise ConfigurationError(
            f"{instance_type} has {type_gpus} GPUs, --gpus asks for {options.gpus}",
            hint="leave --instance-type out to pick one by --gpus",
        )
    image = check_ami(ec2, settings.ami) if settings.ami else find_ami(ec2, architecture)
    vpc_id = vpc_for(ec2, settings.subnet_id)

    token = None if settings.no_auth else (options.token or secrets.token_urlsafe(24))
    uploads: list[tuple[Path, str]] = []
    fetches: list[WrapperFetch] = []

    def ship(wrapper: str | None, where: tuple[str, ...]) -> str | None:
        """The wrapper's path on the instance: a local file is uploaded beside the experiment
        and fetched there (a per-model one under its model's name: basenames may clash)."""
        if not wrapper or not Path(wrapper).is_file():
            if wrapper:
                log.warning("wrapper %r is not a file here: it must be importable on the instance",
                            wrapper)
            return wrapper
        local = Path(wrapper).resolve()
        key = store.location.key("experiments", options.model_specs()[0].key, "wrapper", *where,
                                 local.name)
        uploads.append((local, key))
        fetches.append(WrapperFetch(store.location.bucket, key,
                                    "/".join((VENV, "wrapper", *where, local.name))))
        return fetches[-1].path

    served = dataclasses.replace(
        options,
        host="0.0.0.0",
        wrapper=ship(options.wrapper, ()),
        wrappers={name: ship(wrapper, (name,)) or wrapper
                  for name, wrapper in options.wrappers.items()},
    )
    tags = {
        "Name": f"studio-plug {','.join(options.keys)}",
        MANAGED_TAG: "true",
        KEY_TAG: ",".join(options.keys),
        PORT_TAG: str(options.port),
        STARTED_BY_TAG: started_by(),
        STORE_TAG: store.url,
    }
    return Plan(options, settings, store, ec2, region, instance_type, image, vpc_id, token,
                served, uploads, fetches, tags)


# --- creating, with undo ------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Undo:
    """What this command created, and how to remove each, run newest first on failure."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, action: Callable[[], Any]) -> None:
        self.steps.append((what, action))

    @contextlib.contextmanager
    def on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.run()
            raise

    def run(self) -> None:
        for what, action in reversed(self.steps):
            say(f"cleaning up: {what}")
            try:
                if action() is False:
                    say(f"warning: could not finish {what}; `studio-plug stop --all` retries")
            except Exception as exc:  # keep undoing the rest
                say(f"warning: {what} failed: {exc}; `studio-plug stop --all` retries")
        self.steps.clear()


def run_instance(plan: Plan, group_id: str) -> str:
    o, s = plan.options, plan.ec2_options
    kwargs: dict[str, Any] = {
        "ImageId": plan.image.image_id,
        "InstanceType": plan.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": plan.user_data().render(),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "SecurityGroupIds": [group_id],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list(plan.tags)},
            {"ResourceType": "volume", "Tags": tag_list(plan.tags)},
        ],
    }
    if s.subnet_id:
        kwargs["SubnetId"] = s.subnet_id
    if s.key_name:
        kwargs["KeyName"] = s.key_name
    if s.iam_profile:
        kwargs["IamInstanceProfile"] = {"Name": s.iam_profile}
    with aws_errors(BackendError, f"a {plan.instance_type} instance for {','.join(o.keys)}"):
        response = plan.ec2.run_instances(**kwargs)
    return str(response["Instances"][0]["InstanceId"])


def execute(plan: Plan) -> int:
    o, s, ec2 = plan.options, plan.ec2_options, plan.ec2
    if not s.iam_profile:
        say(f"note: without --iam-profile the instance needs another way to read {plan.store.url}")
    if plan.token is None:
        say(f"warning: --no-auth: anyone who can reach port {o.port} from {s.cidr} may use the model")
    undo = Undo()
    with undo.on_failure():
        for local, key in plan.wrapper_uploads:
            plan.store.upload(local, key)
            undo.push(f"deleting s3://{plan.store.location.bucket}/{key}",
                      functools.partial(plan.store.delete, key))
        rules = wanted_rules(o.port, s.cidr, ssh=bool(s.key_name))
        group_id, created = ensure_group(ec2, plan.vpc_id, o.port, rules, {
            k: v for k, v in plan.tags.items() if k not in (KEY_TAG, STARTED_BY_TAG, "Name")
        })
        say(f"security group {group_id} ({'created' if created else 'reused'}): TCP "
            + ", ".join(f"{low} from {cidr}" for _, low, _, cidr in sorted(rules)))
        if created:
            undo.push(f"deleting security group {group_id}", lambda: delete_group(ec2, group_id))
        instance_id = run_instance(plan, group_id)
        undo.push(f"terminating {instance_id}", lambda: not terminate(ec2, [instance_id], 300.0))
        say(f"started {instance_id} ({plan.instance_type}, {plan.image.image_id} {plan.image.name}) "
            f"in {plan.region}; waiting for it to run (at most {s.launch_timeout:g} s)")
        address = wait_for_address(ec2, instance_id, s.launch_timeout)
        url = f"http://{address}:{o.port}/"
        if s.wait_ready:
            say(f"waiting for {url}v2/health/ready (installing takes a few minutes)")
            wait_ready(url, s.launch_timeout)
    print(url, flush=True)
    print(f"instance: {instance_id} ({plan.instance_type} in {plan.region})", flush=True)
    if plan.token:
        print(f"token: {plan.token}", flush=True)
    say(f"it stops itself after {o.killafter:g} s without requests; now: "
        f"`studio-plug stop {instance_id} --region {plan.region}`")
    return 0


class Ec2Backend(Backend):
    name = "ec2"
    help = ("a new EC2 instance running the same serve command, or with --replicas a fleet of "
            "them behind a load balancer (needs an s3:// store)")

    def cli_options(self) -> Sequence[click.Option]:
        return [*cli_options(), *fleet_cli_options()]

    def launch(self, context: LaunchContext) -> int:
        fleet = FleetOptions.from_options(context.options)
        fleet.refuse_without_fleet()
        if fleet.wanted:  # --replicas / --min-replicas / --max-replicas: ec2_fleet.py
            from plugins.backends.ec2_fleet import execute_fleet, plan_fleet

            return execute_fleet(plan_fleet(context))
        return execute(plan(context))


@hookimpl
def studio_register_backends(register: Callable[[Backend], None]) -> None:
    register(Ec2Backend())
