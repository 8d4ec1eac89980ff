"""``studio-plug ls`` and ``studio-plug stop`` against moto's standalone server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from studio_plugins.cli import build_cli
from studio_plugins.testing import make_host

STORE = "s3://models/prod"


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_cli(make_host()), list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def ec2(aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import boto3

    monkeypatch.setenv("STUDIO_EC2_AMI_NAME", "Deep Learning AMI Ubuntu Linux*")
    monkeypatch.setenv("STUDIO_EC2_AMI_OWNER", "898082745236")
    boto3.client("s3").create_bucket(Bucket="models")
    (tmp_path / "m").mkdir()
    np.save(tmp_path / "m" / "weights.npy", np.ones(3))
    for key in ("alpha", "beta"):
        assert cli("experiments", "push", key, str(tmp_path / "m"), "--store", STORE)[0] == 0
    return boto3.client("ec2")


def start(key: str, *args: str) -> str:
    code, out, err = cli("serve", key, "--cloud", "ec2", "--store", STORE, *args)
    assert code == 0, err
    return out.splitlines()[1].split()[1]


def state(ec2: Any, instance_id: str) -> str:
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return str(reservation["Instances"][0]["State"]["Name"])


def our_groups(ec2: Any) -> list[str]:
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "tag:studio-plug:managed", "Values": ["true"]}])["SecurityGroups"]
    return [g["GroupId"] for g in groups]


def test_ls_and_stop(ec2) -> None:
    code, out, err = cli("ls")
    assert code == 0 and out == "" and "no studio-plug servers running" in err

    first = start("alpha", "--port", "8080", "--gpus", "1")
    second = start("beta", "--port", "8080", "--gpus", "1")
    foreign = ec2.run_instances(ImageId="ami-dca37ea5", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    (group,) = our_groups(ec2)  # same rules: one group for both

    code, out, err = cli("ls")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:8] == ["INSTANCE", "KEY", "ADDRESS", "PORT", "TYPE", "STATE", "SERVER",
                                  "AGE"]
    cells = {row.split()[0]: row.split() for row in rows}  # oldest first; same second here
    listed = {name: row[1:6] + row[7:8] for name, row in cells.items()}
    assert sorted(listed) == sorted([first, second])
    described = ec2.describe_instances(InstanceIds=[first])["Reservations"][0]["Instances"][0]
    assert listed[first] == ["alpha", described["PublicIpAddress"], "8080", "g5.xlarge", "running", "0m"]
    # SERVER: no studio-plug server is at moto's address (nothing, or this network's stand-in)
    assert cells[first][6] == "booting" or cells[first][6].startswith("http-")
    assert listed[second][0] == "beta"
    assert foreign not in out

    code, _out, err = cli("stop", foreign)  # not ours: refused, left running
    assert code == 1
    assert f"error: not a running studio-plug server: {foreign}" in err
    assert state(ec2, foreign) == "running"

    code, out, err = cli("stop", first)
    assert code == 0, err
    assert f"stopped {first} (alpha)" in out
    assert state(ec2, first) == "terminated"
    assert our_groups(ec2) == [group]  # still used by the second server
    assert "deleted security group" not in out

    code, out, err = cli("ls")
    assert [row.split()[0] for row in out.splitlines()[1:]] == [second]

    code, out, err = cli("stop", "--all")
    assert code == 0, err
    assert f"stopped {second} (beta)" in out
    assert f"deleted security group {group}" in out
    assert state(ec2, second) == "terminated" and state(ec2, foreign) == "running"
    assert our_groups(ec2) == []
    code, out, err = cli("ls")
    assert out == ""


def test_stop_needs_ids_or_all(ec2) -> None:
    code, _out, err = cli("stop")
    assert code == 2 and "name the instances to stop, or pass --all" in err
    code, _out, err = cli("stop", "i-0123456789abcdef0", "--all")
    assert code == 2
    code, _out, err = cli("stop", "i-0123456789abcdef0")
    assert code == 1 and err.startswith("error: no such instance: i-0123456789abcdef0")


def test_stop_all_removes_groups_left_behind(ec2) -> None:
    from plugins.backends.ec2.firewall import ensure_group, vpc_for, wanted_rules

    rules = wanted_rules(9000, "0.0.0.0/0", False)
    group_id, created = ensure_group(ec2, vpc_for(ec2, None), 9000, rules, {})
    assert created
    other = ec2.create_security_group(GroupName="not-ours", Description="keep")["GroupId"]
    code, out, err = cli("stop", "--all")
    assert code == 0, err
    assert out.splitlines() == [f"deleted security group {group_id}"]
    remaining = [g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]]
    assert group_id not in remaining and other in remaining
