"""A server's secrets in SSM Parameter Store: its token and its TLS key and certificate.

User data is readable through instance metadata by any process on the instance and by anyone
allowed ``DescribeInstanceAttribute`` (a fleet's, by whoever reads its launch template), so it
holds only the parameters' *names*; the values are SecureStrings the instance reads with its
instance profile at boot (``boot.py``). Each launch gets a fresh run id: its parameters are
``/studio-plug/<run id>/token`` and ``.../tls``, tagged ``studio-plug:managed`` (as the rest of
what we create) and ``studio-plug:run``, which the instance (a fleet's parts) carries too, so
``ls`` shows a server's parameters and ``stop`` deletes them — only those under the prefix and
tagged as ours, never others.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from plugins.aws import aws_errors, error_code
from plugins.backends.ec2.firewall import MANAGED_TAG
from plugins.backends.ec2.instances import tag_list
from studio_plugins import BackendError, ConfigurationError

PREFIX = "/studio-plug"
RUN_TAG = "studio-plug:run"
STANDARD_LIMIT = 4096
"""A standard parameter's largest value; up to ``ADVANCED_LIMIT`` needs the advanced tier."""
ADVANCED_LIMIT = 8192
ORPHAN_GRACE = 3600.0
"""How old a parameter no live instance's run names must be for ``stop`` to delete it."""
TLS_FILES = ("cert.pem", "key.pem", "ca-certs.pem")
"""What the ``tls`` parameter may hold (a JSON object file name -> PEM), as the instance writes it."""


def new_run_id() -> str:
    return secrets.token_hex(8)


def parameter_name(run_id: str, what: str) -> str:
    return f"{PREFIX}/{run_id}/{what}"


def run_of(name: str) -> str:
    """The run id in ``/studio-plug/<run id>/...``."""
    return name.removeprefix(PREFIX + "/").split("/", 1)[0]


def parameter_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a parameter carries: ours, the run's and a fleet's (Parameter Store allows fewer
    characters in tag values than EC2, e.g. no commas: the key list and name are left out)."""
    return {k: v for k, v in tags.items() if k in (MANAGED_TAG, RUN_TAG, "studio-plug:fleet")}


def put_secret(ssm: Any, name: str, value: str, tags: Mapping[str, str]) -> None:
    """Create ``name`` as a SecureString (encrypted with the account's ``aws/ssm`` key). A name
    that exists already is an error, never overwritten: run ids are fresh."""
    if len(value) > ADVANCED_LIMIT:
        raise ConfigurationError(
            f"{name} would hold {len(value)} characters; Parameter Store takes {ADVANCED_LIMIT}",
            hint="use a shorter certificate chain (the server's certificate and its CA's)")
    with aws_errors(BackendError, f"parameter {name}"):
        ssm.put_parameter(
            Name=name, Value=value, Type="SecureString",
            Description="studio-plug: read by the server at boot; deleted by `studio-plug stop`",
            Tier="Standard" if len(value) <= STANDARD_LIMIT else "Advanced",
            Tags=tag_list(parameter_tags(tags)))


def tls_value(files: Mapping[str, bytes]) -> str:
    """The ``tls`` parameter's value: a JSON object from file name (``TLS_FILES``) to PEM text."""
    return json.dumps({name: pem.decode("ascii") for name, pem in files.items()}, sort_keys=True)


def read_own_tls(certfile: str, keyfile: str, ca_certs: str | None) -> dict[str, bytes]:
    """A user's own ``--certfile``/``--keyfile`` (and ``--ca-certs``), read here to travel as a
    parameter: their local paths mean nothing on the instance."""
    files = {"cert.pem": certfile, "key.pem": keyfile}
    if ca_certs:
        files["ca-certs.pem"] = ca_certs
    read = {}
    for name, path in files.items():
        try:
            read[name] = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            read[name].decode("ascii")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{path} is not a PEM file") from None
    return read


def our_parameters(ssm: Any, managed: str = "true", fleet: str | None = None) -> list[dict[str, Any]]:
    """Our parameters (under the prefix, tagged ``studio-plug:managed=managed``, and a fleet's
    name), as ``DescribeParameters`` gives them (names and dates, never values), by name."""
    filters = [{"Key": "Path", "Option": "Recursive", "Values": [PREFIX]},
               {"Key": f"tag:{MANAGED_TAG}", "Values": [managed]}]
    if fleet:
        filters.append({"Key": "tag:studio-plug:fleet", "Values": [fleet]})
    found: list[dict[str, Any]] = []
    with aws_errors(BackendError, "Parameter Store"):
        for page in ssm.get_paginator("describe_parameters").paginate(ParameterFilters=filters):
            found += page.get("Parameters", [])
    return sorted(found, key=lambda p: str(p["Name"]))


def to_delete(ssm: Any, runs: Iterable[str], live_runs: Iterable[str],
              grace: float = ORPHAN_GRACE) -> list[str]:
    """The parameters ``stop`` deletes: those of the servers it stops (``runs``), and those
    left behind (no live instance of their run, e.g. after a stop that failed half-way) once
    older than ``grace`` s, so that a launch under way, which creates them before its
    instance, keeps its own."""
    runs, live_runs = set(runs), set(live_runs)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace)
    names = []
    for parameter in our_parameters(ssm):
        run = run_of(str(parameter["Name"]))
        modified = parameter.get("LastModifiedDate") or dt.datetime.now(dt.UTC)
        if run in runs or (run not in live_runs and modified < cutoff):
            names.append(str(parameter["Name"]))
    return names


def by_run(parameters: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Parameter names by run id (what ``ls`` shows beside each server)."""
    found: dict[str, list[str]] = {}
    for parameter in parameters:
        name = str(parameter["Name"])
        found.setdefault(run_of(name), []).append(name)
    return found


def delete_parameters(ssm: Any, names: Iterable[str]) -> list[str]:
    """Delete these parameters; those already gone count as deleted (``stop`` can run again).
    Returns the names deleted."""
    names = sorted(names)
    deleted: list[str] = []
    for start in range(0, len(names), 10):  # DeleteParameters takes 10 at a time
        batch = names[start:start + 10]
        with aws_errors(BackendError, "parameters " + ", ".join(batch)):
            response = ssm.delete_parameters(Names=batch)
        deleted += response.get("DeletedParameters", []) + response.get("InvalidParameters", [])
    return sorted(deleted)


def delete_parameter(ssm: Any, name: str) -> None:
    """Delete one parameter, gone already or not (for ``Undo``)."""
    try:
        ssm.delete_parameter(Name=name)
    except Exception as exc:
        if error_code(exc) != "ParameterNotFound":
            with aws_errors(BackendError, f"parameter {name}"):
                raise
