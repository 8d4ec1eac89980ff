"""``studio-plug ls`` and ``studio-plug stop NAME`` for fleets, against moto's standalone server.

moto deletes at once what AWS deletes over minutes (groups, balancers) and lets a security group
in use be deleted, so waiting and retrying are not exercised here; what is checked is that
``stop`` finds every part by the fleet's name and tags, removes each kind, touches nothing that
is not the fleet's, and can be run again, also after a part was removed by other means.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.plugins.test_ec2_backend import cli
from tests.plugins.test_ec2_fleet import (
    STORE,
    acm,
    fleet_instances,
    launch_fleet,
    launched_fleet,
    leftovers,
    listeners_of,
    ssm,
)

pytestmark = pytest.mark.timeout(120)


def start_fleet(*args: str) -> tuple[str, str]:
    """(name, url) of a new fleet."""
    code, out, err = launch_fleet(*args)
    assert code == 0, err
    url, name, _token = launched_fleet(out)
    return name, url


def parts(aws: SimpleNamespace, name: str) -> dict[str, Any]:
    """What exists of fleet ``name``, by kind (empty lists, None: gone)."""
    from botocore.exceptions import ClientError

    def exists(call: Any, **kwargs: Any) -> bool:
        try:
            return bool(call(**kwargs))
        except ClientError:
            return False

    return {
        "group": aws.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"],
        "policies": aws.asg.describe_policies(AutoScalingGroupName=name)["ScalingPolicies"],
        "instances": fleet_instances(aws, name),
        "balancer": exists(aws.elb.describe_load_balancers, Names=[name]),
        "target group": exists(aws.elb.describe_target_groups, Names=[name]),
        "template": exists(aws.ec2.describe_launch_templates, LaunchTemplateNames=[name]),
        "security groups": aws.ec2.describe_security_groups(Filters=[
            {"Name": "tag:studio-plug:fleet", "Values": [name]}])["SecurityGroups"],
    }


def test_ls_lists_fleets_beside_servers_and_stop_removes_one_fleet_entirely(fleet_cloud) -> None:
    aws = fleet_cloud
    alpha, alpha_url = start_fleet("--replicas", "2", "--fleet-name", "alpha-fleet")
    beta, beta_url = start_fleet("--min-replicas", "1", "--max-replicas", "3", "--target-rps", "4",
                                 "--fleet-name", "beta-fleet", "--lb-port", "8080")
    code, out, err = cli("serve", "exp", "--cloud", "ec2", "--store", STORE, "--port", "7000")
    assert code == 0, err
    single = out.splitlines()[1].split()[1]

    code, out, err = cli("ls")
    assert code == 0, err
    servers, fleets = out.split("\n\n")
    assert [row.split()[0] for row in servers.splitlines()[1:]] == [single]  # replicas not here
    header, *rows = fleets.splitlines()
    assert header.split() == ["FLEET", "KEY", "DESIRED", "IN-SERVICE", "URL", "SERVER", "AGE",
                              "STARTED", "BY", "PARAMETERS"]
    listed = {row.split()[0]: row.split()[1:5] + row.split()[6:7] for row in rows}
    token_parameter = {row.split()[0]: row.split()[-1] for row in rows}[alpha]
    assert re.fullmatch(r"/studio-plug/[0-9a-f]+/token", token_parameter)
    assert listed == {alpha: ["exp", "2", "2", alpha_url, "0m"], beta: ["exp", "1", "1", beta_url, "0m"]}
    # SERVER: no studio-plug server behind moto's balancer (nothing, or this network's stand-in)
    assert all(row.split()[5] == "booting" or row.split()[5].startswith("http-") for row in rows)

    assert alpha_url.startswith("https://") and beta_url.startswith("https://")
    listeners = listeners_of(aws, alpha)
    (certificate,) = {c["CertificateArn"] for li in listeners for c in li.get("Certificates", [])}
    code, out, err = cli("stop", alpha)
    assert code == 0, err
    assert out == f"stopped fleet {alpha}\n"
    steps = [line.split()[1] + " " + line.split()[2] for line in err.splitlines()
             if line.startswith("deleting ")]
    # the certificate after the balancer and the listener that used it
    assert steps == ["auto scaling", "load balancer", f"certificate {certificate}", "target group",
                     "launch template", f"parameters {token_parameter}", "security group",
                     "security group"]
    with pytest.raises(ClientError, match="ResourceNotFound"):
        acm().describe_certificate(CertificateArn=certificate)
    assert len(leftovers(aws)["certificates"]) == 1  # beta's
    assert "(replicas)" in err.splitlines()[-2] and "(balancer)" in err.splitlines()[-1]
    assert parts(aws, alpha) == {"group": [], "policies": [], "instances": [], "balancer": False,
                                 "target group": False, "template": False, "security groups": []}
    for listener in listeners:
        with pytest.raises(ClientError, match="ListenerNotFound"):
            aws.elb.describe_listeners(ListenerArns=[listener["ListenerArn"]])
    left = parts(aws, beta)  # the other fleet and the single server are untouched
    assert len(left["instances"]) == 1 and len(left["policies"]) == 1 and left["balancer"]
    assert len(left["security groups"]) == 2
    listed_now = cli("ls")[1]
    assert single in listed_now and beta in listed_now and alpha not in listed_now

    code, out, err = cli("stop", alpha)  # again: nothing to do, and fine
    assert code == 0, err
    assert out == "" and f"fleet {alpha}: nothing left to delete" in err

    code, out, err = cli("stop", single)  # a lone server's stop leaves the fleet's groups be
    assert code == 0, err
    assert f"stopped {single} (exp)" in out and "deleted security group" in out
    assert len(parts(aws, beta)["security groups"]) == 2

    code, out, err = cli("stop", "--all")
    assert code == 0, err
    assert out == f"stopped fleet {beta}\n"
    assert leftovers(aws) == {}
    code, out, err = cli("ls")
    assert code == 0 and out == "" and "no studio-plug servers running" in err
    code, out, err = cli("stop", "--all")
    assert code == 0 and out == "", err


def test_stop_finishes_a_fleet_whose_parts_were_partly_removed(fleet_cloud) -> None:
    aws = fleet_cloud
    name, _url = start_fleet("--min-replicas", "1", "--max-replicas", "2", "--target-rps", "1")
    # as if an earlier stop had been interrupted after the group, the balancer and the target
    # group were removed (the policy by hand too: AWS deletes it with its group, moto does not)
    aws.asg.delete_policy(AutoScalingGroupName=name, PolicyName=f"{name}-requests")
    aws.asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
    balancer = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"][0]
    aws.elb.delete_load_balancer(LoadBalancerArn=balancer["LoadBalancerArn"])
    target_group = aws.elb.describe_target_groups(Names=[name])["TargetGroups"][0]
    aws.elb.delete_target_group(TargetGroupArn=target_group["TargetGroupArn"])

    code, out, err = cli("ls")  # what is left still shows, so it is not forgotten
    assert code == 0, err
    (row,) = out.splitlines()[1:]
    assert row.split()[:5] == [name, "exp", "-", "-", "-"]

    code, out, err = cli("stop", name)
    assert code == 0, err
    assert out == f"stopped fleet {name}\n"
    assert "deleting auto scaling group" not in err and "deleting load balancer" not in err
    assert "deleting launch template" in err and err.count("deleting security group") == 2
    assert leftovers(aws) == {}


def test_stop_touches_neither_lookalikes_nor_a_fleets_replicas(fleet_cloud) -> None:
    aws = fleet_cloud
    vpc = aws.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    aws.elb.create_target_group(Name="lookalike", Protocol="HTTP", Port=80, VpcId=vpc)
    aws.ec2.create_launch_template(LaunchTemplateName="lookalike",
                                   LaunchTemplateData={"ImageId": "ami-dca37ea5"})
    code, _out, err = cli("stop", "lookalike")
    assert code == 1
    assert "warning: target group lookalike is not part of a studio-plug fleet; left alone" in err
    assert "error: not a studio-plug fleet: lookalike" in err
    assert aws.elb.describe_target_groups(Names=["lookalike"])["TargetGroups"]
    assert aws.ec2.describe_launch_templates(LaunchTemplateNames=["lookalike"])["LaunchTemplates"]

    name, _url = start_fleet("--replicas", "1")
    (replica,) = fleet_instances(aws, name)
    code, _out, err = cli("stop", replica["InstanceId"])  # the group owns it: stop the fleet
    assert code == 1 and "not a running studio-plug server" in err
    assert len(fleet_instances(aws, name)) == 1
    code, _out, err = cli("stop", "--all")  # lookalikes survive --all too
    assert code == 0, err
    assert aws.elb.describe_target_groups(Names=["lookalike"])["TargetGroups"]
    assert set(leftovers(aws)) == {"target groups", "launch templates"}


def test_a_fleets_certificate_left_alone_still_shows_and_stop_deletes_it(fleet_cloud) -> None:
    aws = fleet_cloud
    name, _url = start_fleet("--replicas", "1")
    (certificate,) = leftovers(aws)["certificates"]
    # as if an earlier stop had removed everything but the certificate (ACM still counted the
    # deleted listener as using it, and the stop ran out of time)
    aws.asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
    balancer = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"][0]
    aws.elb.delete_load_balancer(LoadBalancerArn=balancer["LoadBalancerArn"])
    target_group = aws.elb.describe_target_groups(Names=[name])["TargetGroups"][0]
    aws.elb.delete_target_group(TargetGroupArn=target_group["TargetGroupArn"])
    aws.ec2.delete_launch_template(LaunchTemplateName=name)
    for group in parts(aws, name)["security groups"]:
        aws.ec2.delete_security_group(GroupId=group["GroupId"])
    ssm().delete_parameters(Names=leftovers(aws)["parameters"])
    assert set(leftovers(aws)) == {"certificates"}

    listed_then_stopped_by_all(aws, name, "exp", f"certificate {certificate}")
    code, out, err = cli("stop", name)  # again: nothing left, and fine
    assert code == 0 and out == "", err


def test_a_fleet_whose_token_is_all_that_is_left_still_shows_and_stop_all_deletes_it(fleet_cloud) -> None:
    aws = fleet_cloud
    name, _url = start_fleet("--replicas", "1")
    (token,) = leftovers(aws)["parameters"]
    # as if an earlier stop had removed every other part and then lost its connection
    code, _out, err = cli("stop", name)
    assert code == 0, err
    ssm().put_parameter(Name=token, Value="t0ken", Type="SecureString")
    ssm().add_tags_to_resource(ResourceType="Parameter", ResourceId=token, Tags=[
        {"Key": "studio-plug:managed", "Value": "fleet"}, {"Key": "studio-plug:fleet", "Value": name}])
    assert leftovers(aws) == {"parameters": [token]}

    listed_then_stopped_by_all(aws, name, "?", f"parameters {token}")  # its tags name no key


def listed_then_stopped_by_all(aws: SimpleNamespace, name: str, key: str, part: str) -> None:
    """What is left of fleet ``name`` keeps it in ``ls`` (not forgotten), with experiment ``key``,
    and ``stop --all`` finds it there and deletes ``part``, the last of it."""
    code, out, err = cli("ls")
    assert code == 0, err
    assert out.splitlines()[1].split()[:5] == [name, key, "-", "-", "-"]
    code, out, err = cli("stop", "--all")
    assert code == 0, err
    assert out == f"stopped fleet {name}\n" and f"deleting {part}" in err
    assert leftovers(aws) == {}
