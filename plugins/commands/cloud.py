"""``studio-plug ls`` and ``studio-plug stop``: the servers ``--cloud ec2`` started.

Both act only on instances tagged ``studio-plug:managed=true``; ``stop`` then deletes our
security groups that no instance uses any more.
"""

from __future__ import annotations

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


region_option = click.option("--region", default=None,
                             help="AWS region; default: AWS_DEFAULT_REGION / your AWS config.")


@click.command("ls")
@region_option
@report_errors
def ls_command(region: str | None) -> None:
    """List the servers started with --cloud ec2: key, address, port, type, age."""
    from plugins.backends.ec2_instances import servers

    found = servers(_ec2(region))
    if not found:
        click.echo("no studio-plug servers running", err=True)
        return
    now = datetime.now(UTC)
    rows = [("INSTANCE", "KEY", "ADDRESS", "PORT", "TYPE", "STATE", "AGE", "STARTED BY")]
    rows += [
        (s.instance_id, s.key, s.address or "-", str(s.port), s.instance_type, s.state,
         _age(s.launched, now), s.started_by)
        for s in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.command("stop")
@click.argument("instance_ids", nargs=-1, metavar="INSTANCE_ID...")
@click.option("--all", "stop_all", is_flag=True, help="Stop every server studio-plug started.")
@click.option("--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds to wait for the instances to terminate before deleting their groups.")
@region_option
@report_errors
def stop_command(instance_ids: tuple[str, ...], stop_all: bool, timeout: float,
                 region: str | None) -> None:
    """Terminate servers started with --cloud ec2, then delete our unused security groups."""
    from plugins.backends.ec2_instances import delete_unused_groups, servers, terminate

    if bool(instance_ids) == stop_all:
        raise click.UsageError("name the instances to stop, or pass --all (not both)")
    ec2 = _ec2(region)
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
    if left or kept:
        raise BackendError(
            f"still shutting down: {', '.join(left + kept)}",
            hint="run `studio-plug stop --all` again in a minute to finish",
        )


@hookimpl
def studio_register_commands(cli: click.Group) -> None:
    cli.add_command(ls_command)
    cli.add_command(stop_command)
