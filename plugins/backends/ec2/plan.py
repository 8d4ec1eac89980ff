"""The plan and its undo, shared by a single instance (``single.py``) and a fleet (``fleet.py``).

Everything that can be checked without creating anything is checked first (store, experiment,
instance type, AMI, VPC), into a ``Plan``. Creating is then done under an ``Undo``: if anything
fails from there on (or Ctrl-C), what this command created is removed again, newest first.
``creating`` is how both paths begin (notes, the wrapper uploads, that ``Undo``), ``await_ready``
and ``announce`` how they end.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from plugins.aws import aws_errors, client
from plugins.backends.ec2.firewall import MANAGED_TAG, vpc_for, wanted_rules
from plugins.backends.ec2.instances import (
    KEY_TAG,
    PORT_TAG,
    SCHEME_TAG,
    STARTED_BY_TAG,
    STORE_TAG,
    started_by,
    wait_ready,
)
from plugins.backends.ec2.machine import Image, check_ami, describe_type, find_ami, instance_type_for
from plugins.backends.ec2.options import Ec2Options
from plugins.backends.ec2.parameters import (
    RUN_TAG,
    delete_parameter,
    new_run_id,
    parameter_name,
    put_secret,
    read_own_tls,
    tls_value,
)
from plugins.backends.ec2.spot import spot_environment
from plugins.backends.ec2.userdata import TLS_DIR, VENV, UserData, WrapperFetch, default_install_spec
from plugins.backends.ec2.wheels import Shipment, build_shipment, upload
from plugins.stores.s3 import S3Store, parse_s3_url
from studio_plugins import (
    BackendError,
    ConfigurationError,
    ExperimentError,
    LaunchContext,
    ServeOptions,
    serve_argv,
    studio_home,
)

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
    ssm: Any = None
    run_id: str = ""
    """Names this launch's parameters (``parameters.py``); tagged on what it creates."""
    tls: bool = False
    """Whether the instance serves HTTPS with the key and certificate of its ``tls`` parameter."""
    own_tls: dict[str, bytes] | None = None
    """The user's own ``--certfile``/``--keyfile`` (``--ca-certs``), shipped as the parameter."""
    parameter_tags: dict[str, str] = field(default_factory=dict)
    """The parameters' tags when not ``tags`` (a fleet's)."""

    @property
    def token_parameter(self) -> str | None:
        return parameter_name(self.run_id, "token") if self.token else None

    @property
    def tls_parameter(self) -> str | None:
        return parameter_name(self.run_id, "tls") if self.tls else None

    def put_parameter(self, undo: Undo, name: str, value: str) -> None:
        """Create one of this launch's SecureStrings, deleted again if the launch fails."""
        put_secret(self.ssm, name, value, self.parameter_tags or self.tags)
        say(f"parameter {name} (SecureString): the instance reads it at boot")
        undo.push(f"deleting parameter {name}", functools.partial(delete_parameter, self.ssm, name))
    shipment: Shipment = field(default_factory=lambda: Shipment((), ()))
    """The wheels built here for the instance (none with --install; ``with_shipment``)."""
    environment: dict[str, str] = field(default_factory=dict)
    """More for the user data to export (``spot.spot_environment``)."""

    def user_data(self) -> UserData:
        environment = {"AWS_DEFAULT_REGION": self.region, **_s3_endpoint_for_instance(),
                       **self.environment}
        served = self.served
        if self.tls:  # the files the instance writes from its tls parameter
            served = dataclasses.replace(
                served, certfile=f"{TLS_DIR}/cert.pem", keyfile=f"{TLS_DIR}/key.pem",
                ca_certs=f"{TLS_DIR}/ca-certs.pem" if self.options.ca_certs else None)
        return UserData(
            serve_argv=serve_argv(served),
            environment=environment,
            install=self.ec2_options.install or default_install_spec(),
            cpu_only=self.options.gpus == 0 and not self.instance_type.startswith(("g", "p")),
            wrappers=tuple(self.wrapper_fetches),
            token_parameter=self.token_parameter,
            tls_parameter=self.tls_parameter,
            wheels=tuple(WrapperFetch(self.store.location.bucket, w.key(self.store),
                                      f"{VENV}/wheels/{w.path.name}") for w in self.shipment.wheels),
            requirements=self.shipment.requirements,
        )


def plan(context: LaunchContext) -> Plan:
    options = context.options
    settings = Ec2Options.from_options(options)
    if options.port == 0:
        raise ConfigurationError(
            "--cloud ec2 needs a fixed --port to open in the firewall", hint="e.g. --port 5000"
        )
    if options.grpc_port == 0:
        raise ConfigurationError(
            "--cloud ec2 needs a fixed --grpc-port to open in the firewall", hint="e.g. --grpc-port 8001"
        )
    if options.grpc_port == options.port:
        raise ConfigurationError(f"--grpc-port and --port are both {options.port}: gRPC needs a port "
                                 "of its own", hint="e.g. --grpc-port 8001")
    if settings.no_auth and options.token:
        raise ConfigurationError("--no-auth and --token contradict each other")
    if settings.no_tls and options.certfile:
        raise ConfigurationError("--no-tls and --certfile contradict each other")
    if (options.keyfile or options.ca_certs) and not options.certfile:
        raise ConfigurationError(
            "--keyfile and --ca-certs go with --certfile (the instance's own certificate)",
            hint="leave them out: the instance gets a certificate from your CA by default")
    if options.ca_certs and settings.wait_ready and not settings.no_tls:
        raise ConfigurationError(
            "--wait-ready cannot check a server that asks for client certificates (--ca-certs)",
            hint="leave --wait-ready out and poll /v2/health/ready with your client certificate")
    # the user's own certificate travels as the tls parameter: a local path means nothing there
    own_tls = (read_own_tls(options.certfile, options.keyfile or options.certfile, options.ca_certs)
               if options.certfile else None)
    wanted_rules(options.port, settings.cidr, False)  # validates --cidr early
    store = s3_store(options)

    with aws_errors(BackendError, "EC2"):
        ec2 = client("ec2", settings.region)
    region = str(ec2.meta.region_name)
    with aws_errors(BackendError, "Parameter Store"):
        ssm = client("ssm", region)
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
        certfile=None, keyfile=None, ca_certs=None,  # the instance's own: see Plan.user_data
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
        RUN_TAG: new_run_id(),
        SCHEME_TAG: "http" if settings.no_tls else "https",
    }
    return Plan(options, settings, store, ec2, region, instance_type, image, vpc_id, token,
                served, uploads, fetches, tags, ssm=ssm, run_id=tags[RUN_TAG],
                tls=not settings.no_tls, own_tls=own_tls,
                environment=spot_environment(drain=0.0) if settings.spot else {})


def with_shipment(plan: Plan) -> Plan:
    """``plan`` with the wheels the instance installs built (none with ``--install``, which
    names something else to install). Building takes seconds, so it is planning's last step,
    after every check that can still refuse the launch (a fleet's come after ``plan``)."""
    if plan.ec2_options.install:
        return plan
    o = plan.options
    modules = [w for w in (o.wrapper, *o.wrappers.values()) if w and not Path(w).is_file()]
    return dataclasses.replace(plan, shipment=build_shipment(modules))


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


@contextlib.contextmanager
def creating(plan: Plan, *, readers: str, port: int) -> Iterator[Undo]:
    """The opening a single server and a fleet share: say what the user should know before
    anything is created, then upload the wrappers and put the token's parameter (and a user's
    own certificate's), under the ``Undo`` the body goes on with.

    ``readers`` says who reads the store (``the instance needs``), ``port`` is where the
    server is reached (a fleet's is the balancer's)."""
    s = plan.ec2_options
    if not s.iam_profile:
        secrets_too = " and its parameters" if plan.token or plan.tls else ""
        say(f"note: without --iam-profile {readers} another way to read {plan.store.url}"
            f"{secrets_too} (see README: the instance profile's policy)")
    if plan.token is None:
        say(f"warning: --no-auth: anyone who can reach port {port} from {s.cidr} may use the model")
    if s.no_tls:
        say("warning: --no-tls: the token and the data cross the network in the clear")
    undo = Undo()
    with undo.on_failure():
        upload(plan.store, plan.shipment.wheels, undo.push, say)
        for local, key in plan.wrapper_uploads:
            plan.store.upload(local, key)
            undo.push(f"deleting s3://{plan.store.location.bucket}/{key}",
                      functools.partial(plan.store.delete, key))
        if plan.token_parameter and plan.token:
            plan.put_parameter(undo, plan.token_parameter, plan.token)
        if plan.tls_parameter and plan.own_tls:
            plan.put_parameter(undo, plan.tls_parameter, tls_value(plan.own_tls))
        yield undo


def await_ready(plan: Plan, url: str, timeout: float, cafile: str | None = None,
                check_hostname: bool = True) -> None:
    """With ``--wait-ready``, wait until ``url`` answers ready (over HTTPS, trusting ``cafile``):
    called inside ``creating``, so a server not ready in time is removed again."""
    if plan.ec2_options.wait_ready:
        say(f"waiting for {url}v2/health/ready (installing takes a few minutes)")
        wait_ready(url, timeout, cafile=cafile, check_hostname=check_hostname)


def announce(plan: Plan, url: str, what: str) -> None:
    """What a launch prints on stdout, a line each and in this order (scripts read them): the
    URL, what serves there, and the token. Without ``--wait-ready`` stderr says first that
    nothing answers there yet."""
    if not plan.ec2_options.wait_ready:
        say(f"booting: {url} does not answer until the instance has installed and loaded the "
            "model (minutes); `studio-plug ls` shows when it does, --wait-ready waits for it")
    print(url, flush=True)
    print(what, flush=True)
    if plan.token:
        print(f"token: {plan.token}", flush=True)
