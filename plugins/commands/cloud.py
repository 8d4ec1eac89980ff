"""``studio-plug ls`` and ``studio-plug stop``: the servers and fleets ``--cloud ec2`` started.

Both act only on instances tagged ``studio-plug:managed=true`` and on fleets' parts tagged
``studio-plug:managed=fleet``; ``stop`` then deletes our security groups that no instance uses
any more. A fleet is stopped by name (``plugins/backends/ec2/fleet_teardown.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from studio_plugins import BackendError, hookimpl
from studio_plugins.cli import report_errors


def _age(launched: datetime, now: datetime) -> str:
    seconds = max(int((now - launched).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m"


def _ec2(region: str | None) -> Any:
    from plugins.aws import aws_errors, client

    with aws_errors(BackendError, "EC2"):
        return client("ec2", region)


def _parameters(region: str | None, managed: str) -> dict[str, list[str]]:
    """Our parameters by run id, for ``ls`` (``{}`` with a warning when they cannot be listed)."""
    from plugins.aws import aws_errors, client
    from plugins.backends.ec2.parameters import by_run, our_parameters

    try:
        with aws_errors(BackendError, "Parameter Store"):
            ssm = client("ssm", region)
        return by_run(our_parameters(ssm, managed))
    except BackendError as exc:
        click.echo(f"warning: could not list parameters: {exc.message}", err=True)
        return {}


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


region_option = click.option("--region", default=None,
                             help="AWS region; default: AWS_DEFAULT_REGION / your AWS config.")


@click.command("ls")
@region_option
@report_errors
def ls_command(region: str | None) -> None:
    """List the servers and fleets started with --cloud ec2: key, address, size, age, and
    whether each server answers yet (ready, loading, or booting: nothing answers)."""
    from plugins.backends.ec2.fleet import clients
    from plugins.backends.ec2.fleet_inventory import fleets
    from plugins.backends.ec2.inventory import servers
    from plugins.backends.ec2.probe import probe_all

    ec2 = _ec2(region)
    found = servers(ec2)
    try:
        groups = fleets(clients(region, ec2))
    except BackendError as exc:  # e.g. no permission for ELB/Auto Scaling: still list servers
        click.echo(f"warning: could not list fleets: {exc.message}", err=True)
        groups = []
    if not found and not groups:
        click.echo("no studio-plug servers running", err=True)
        return
    now = datetime.now(UTC)
    # does each server answer /v2/health/ready yet? all asked at once, a few seconds at most
    answers = probe_all([s.url for s in found if s.state == "running"] + [f.url for f in groups])
    if found:
        stored = _parameters(region, "true")
        _table([("INSTANCE", "KEY", "ADDRESS", "PORT", "TYPE", "STATE", "SERVER", "AGE",
                 "STARTED BY", "PARAMETERS")] + [
            (s.instance_id, s.key, s.address or "-", str(s.port),
             s.instance_type + (" spot" if s.spot else ""), s.state,
             answers.get(s.url, "-") if s.state == "running" else "-", _age(s.launched, now),
             s.started_by, ",".join(stored.get(s.run, [])) or "-")
            for s in found
        ])
    if found and groups:
        click.echo()
    if groups:
        stored = _parameters(region, "fleet")
        _table([("FLEET", "KEY", "DESIRED", "IN-SERVICE", "URL", "SERVER", "AGE", "STARTED BY",
                 "PARAMETERS")] + [
            (f.name, f.key, "-" if f.desired is None else str(f.desired),
             ("-" if f.in_service is None else str(f.in_service))
             + ("" if f.spot is None else f" ({f.spot} spot)"), f.url, answers.get(f.url, "-"),
             _age(f.created, now),
             f.started_by, ",".join(stored.get(f.run, [])) or "-")
            for f in groups
        ])


@click.command("stop")
@click.argument("targets", nargs=-1, metavar="INSTANCE_ID|FLEET...")
@click.option("--all", "stop_all", is_flag=True,
              help="Stop every server and fleet studio-plug started.")
@click.option("--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds to wait for instances to terminate (and a fleet's balancer to go) "
              "before deleting their security groups.")
@region_option
@report_errors
def stop_command(targets: tuple[str, ...], stop_all: bool, timeout: float,
                 region: str | None) -> None:
    """Terminate servers started with --cloud ec2 and remove fleets (by name), then delete our
    unused security groups. Safe to run again after a partial failure."""
    from plugins.backends.ec2.fleet import clients
    from plugins.backends.ec2.fleet_inventory import fleet_names
    from plugins.backends.ec2.fleet_options import looks_like_instance_id
    from plugins.backends.ec2.inventory import delete_unused_groups, servers, terminate

    if bool(targets) == stop_all:
        raise click.UsageError("name the instances to stop, or pass --all (not both)")
    instance_ids = tuple(t for t in targets if looks_like_instance_id(t))
    names = [t for t in targets if not looks_like_instance_id(t)]
    again = f"`studio-plug stop {' '.join(targets) if targets else '--all'}`"
    ec2 = _ec2(region)
    fleet_clients = clients(region, ec2)
    if stop_all:
        try:
            names = fleet_names(fleet_clients)
        except BackendError as exc:
            click.echo(f"warning: could not list fleets: {exc.message}", err=True)
    left_in_fleets = _stop_fleets(fleet_clients, names, timeout)
    if names and not instance_ids and not stop_all:
        if left_in_fleets:
            _unfinished(left_in_fleets, again)
        return
    ours = servers(ec2, instance_ids)
    if instance_ids:
        others = sorted(set(instance_ids) - {s.instance_id for s in ours})
        if others:
            raise BackendError(
                f"not a running studio-plug server: {', '.join(others)}",
                hint="studio-plug stops only the instances it started (see `studio-plug ls`)",
            )
    ids = [s.instance_id for s in ours]
    if ids:
        click.echo(f"terminating {', '.join(ids)}", err=True)
    left = terminate(ec2, ids, timeout)
    for server in ours:
        if server.instance_id not in left:
            click.echo(f"stopped {server.instance_id} ({server.key})")
    deleted, kept = delete_unused_groups(ec2)
    for group_id in deleted:
        click.echo(f"deleted security group {group_id}")
    kept += _delete_parameters(ec2, region, [s.run for s in ours if s.run])
    if left or kept or left_in_fleets:
        _unfinished(left + kept + left_in_fleets, again)


def _delete_parameters(ec2: Any, region: str | None, runs: list[str]) -> list[str]:
    """Delete the stopped servers' parameters and those left behind; returns what is left."""
    from plugins.aws import aws_errors, client
    from plugins.backends.ec2.inventory import servers
    from plugins.backends.ec2.parameters import delete_parameters, to_delete

    try:
        with aws_errors(BackendError, "Parameter Store"):
            ssm = client("ssm", region)
        live = [s.run for s in servers(ec2) if s.run and s.run not in runs]
        for name in delete_parameters(ssm, to_delete(ssm, runs, live)):
            click.echo(f"deleted parameter {name}")
    except BackendError as exc:
        click.echo(f"warning: could not delete parameters: {exc.message}", err=True)
        return ["parameters"]
    return []


def _unfinished(what: list[str], command: str) -> None:
    raise BackendError(
        f"still shutting down: {', '.join(what)}",
        hint=f"run {command} again in a minute to finish",
    )


def _stop_fleets(fleet_clients: Any, names: list[str], timeout: float) -> list[str]:
    """Stop each fleet; returns the fleets not completely gone yet. A name that only other
    things (not a fleet's parts) carry is refused."""
    from plugins.backends.ec2.fleet_teardown import stop_fleet

    unfinished, not_ours = [], []
    for name in names:
        done = stop_fleet(fleet_clients, name, timeout,
                          progress=lambda line: click.echo(line, err=True))
        for what in done.foreign:
            click.echo(f"warning: {what} is not part of a studio-plug fleet; left alone", err=True)
        for what in done.left:
            click.echo(f"warning: {what}", err=True)
        if done.left:
            unfinished.append(f"fleet {name}")
        elif done.removed:
            click.echo(f"stopped fleet {name}")
        elif done.foreign:
            not_ours.append(name)
        else:
            click.echo(f"fleet {name}: nothing left to delete", err=True)
    if not_ours:
        raise BackendError(
            f"not a studio-plug fleet: {', '.join(not_ours)}",
            hint="studio-plug stops only the fleets it started (see `studio-plug ls`)",
        )
    return unfinished


@hookimpl
def studio_register_commands(cli: click.Group) -> None:
    cli.add_command(ls_command)
    cli.add_command(stop_command)
