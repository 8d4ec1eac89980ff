"""A fleet's replicas: the launch template, the Auto Scaling group and its scaling policy.

The launch template carries the very user data a single instance gets (``ec2_userdata``), so
what the single-instance tests prove of one instance holds for every replica. The group spans
the default VPC's subnets, registers its instances with the target group and replaces those
the balancer finds unhealthy once ``--launch-timeout`` (the grace period) has passed.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from plugins.aws import aws_errors, error_code
from plugins.backends.ec2.backoff import Backoff, Sleep, wait_until
from plugins.backends.ec2.balancer import tolerating
from plugins.backends.ec2.fleet_options import Sizes
from plugins.backends.ec2.instances import LIVE_STATES, describe, tag_list
from studio_plugins import BackendError, __version__

GROUP_TAG = "aws:autoscaling:groupName"
"""AWS tags every instance of a group with the group's name."""
REQUESTS_PER_TARGET = "ALBRequestCountPerTarget"


def create_launch_template(
    ec2: Any, name: str, *, image_id: str, instance_type: str, user_data: str, group_id: str,
    key_name: str | None, iam_profile: str | None, tags: dict[str, str],
) -> str:
    data: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "UserData": base64.b64encode(user_data.encode()).decode(),  # templates take it encoded
        "SecurityGroupIds": [group_id],
        # as for a single instance: a replica whose serve exits powers off and is gone; the
        # group starts another in its place
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list(tags)},
            {"ResourceType": "volume", "Tags": tag_list(tags)},
        ],
    }
    if key_name:
        data["KeyName"] = key_name
    if iam_profile:
        data["IamInstanceProfile"] = {"Name": iam_profile}
    with aws_errors(BackendError, f"launch template {name}"):
        template = ec2.create_launch_template(
            LaunchTemplateName=name,
            VersionDescription=f"studio-plug {__version__}",
            LaunchTemplateData=data,
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag_list(tags)}],
        )["LaunchTemplate"]
    return str(template["LaunchTemplateId"])


def replica_subnets(ec2: Any, instance_type: str, subnets: dict[str, str]) -> list[str]:
    """The subnets (by zone) in whose zone ``instance_type`` is offered: the group launches
    only there (the balancer spans every zone and reaches targets across zones)."""
    with aws_errors(BackendError, f"where {instance_type} is offered"):
        offered = {o["Location"] for o in ec2.describe_instance_type_offerings(
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [instance_type]}],
        )["InstanceTypeOfferings"]}
    usable = [subnet for zone, subnet in sorted(subnets.items()) if zone in offered]
    if not usable:
        raise BackendError(
            f"{instance_type} is offered in none of the zones {', '.join(sorted(subnets))}",
            hint="pick another --instance-type (or --gpus), or another --region",
        )
    return usable


def create_scaling_group(
    asg: Any, name: str, *, template_id: str, subnets: list[str], sizes: Sizes,
    target_group_arn: str, grace: float, tags: dict[str, str],
    mixed: dict[str, Any] | None = None,
) -> None:
    """``mixed``: a mixed-instances policy (``spot.py``) in place of the template alone; capacity
    rebalancing comes with it."""
    launch: dict[str, Any] = (
        {"MixedInstancesPolicy": mixed, "CapacityRebalance": True} if mixed
        else {"LaunchTemplate": {"LaunchTemplateId": template_id, "Version": "$Latest"}})
    with aws_errors(BackendError, f"auto scaling group {name}"):
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            **launch,
            MinSize=sizes.minimum, MaxSize=sizes.maximum, DesiredCapacity=sizes.desired,
            VPCZoneIdentifier=",".join(subnets),
            TargetGroupARNs=[target_group_arn],
            # the balancer's /v2/health/ready decides; an instance has the grace period to
            # install and load its model first
            HealthCheckType="ELB",
            HealthCheckGracePeriod=int(grace),
            Tags=[{**tag, "PropagateAtLaunch": True, "ResourceId": name,
                   "ResourceType": "auto-scaling-group"} for tag in tag_list(tags)],
        )


def put_request_policy(asg: Any, group: str, label: str, target_rps: float) -> str:
    """Target tracking on the balancer's requests per instance. The metric counts requests per
    minute, so the target is ``60 * target_rps``."""
    name = f"{group}-requests"
    with aws_errors(BackendError, f"scaling policy {name}"):
        asg.put_scaling_policy(
            AutoScalingGroupName=group, PolicyName=name, PolicyType="TargetTrackingScaling",
            TargetTrackingConfiguration={
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": REQUESTS_PER_TARGET, "ResourceLabel": label,
                },
                "TargetValue": float(target_rps) * 60.0,
                "DisableScaleIn": False,
            },
        )
    return name


def delete_policies(asg: Any, group: str) -> bool:
    """Delete the group's scaling policies (AWS deletes them with the group; moto does not, and
    a policy first means a group that is being removed is not scaled out again). True."""
    with aws_errors(BackendError, f"the scaling policies of {group}"):
        policies = asg.describe_policies(AutoScalingGroupName=group)["ScalingPolicies"]
    for policy in policies:
        tolerating(["ValidationError"], f"scaling policy {policy['PolicyName']}", asg.delete_policy,
                   AutoScalingGroupName=group, PolicyName=policy["PolicyName"])
    return True


def find_scaling_group(asg: Any, name: str) -> dict[str, Any] | None:
    with aws_errors(BackendError, f"auto scaling group {name}"):
        found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return dict(found[0]) if found else None


def tagged_scaling_groups(asg: Any, tag: str, value: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    with aws_errors(BackendError, "auto scaling groups"):
        pages = asg.get_paginator("describe_auto_scaling_groups").paginate(
            Filters=[{"Name": f"tag:{tag}", "Values": [value]}])
        for page in pages:
            groups.extend(page["AutoScalingGroups"])
    return groups


def in_service(group: dict[str, Any]) -> int:
    return sum(1 for i in group.get("Instances", []) if i.get("LifecycleState") == "InService")


def wait_in_service(asg: Any, name: str, count: int, timeout: float, sleep: Sleep = time.sleep) -> None:
    """Wait (with backoff) until ``count`` instances of the group are in service."""
    backoff = Backoff(timeout, sleep=sleep)
    while True:
        group = find_scaling_group(asg, name)
        if group is None:
            raise BackendError(f"auto scaling group {name} is gone")
        seen = in_service(group)
        if seen >= count:
            return
        if backoff.spent:
            raise BackendError(
                f"{seen} of {count} instances in service after {timeout:g} s",
                hint=f"see the group's activity: `aws autoscaling describe-scaling-activities "
                f"--auto-scaling-group-name {name}`",
            )
        backoff.pause()


def live_instances(ec2: Any, group: str) -> list[str]:
    found = describe(ec2, [{"Name": f"tag:{GROUP_TAG}", "Values": [group]},
                           {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
    return sorted(str(i["InstanceId"]) for i in found)


def delete_scaling_group(
    asg: Any, ec2: Any, name: str, timeout: float = 300.0, sleep: Sleep = time.sleep
) -> bool:
    """Scale to 0 and force-delete the group with its instances; wait until the group and its
    instances are gone. True when they are (a group already gone counts)."""
    group = find_scaling_group(asg, name)
    if group is not None and group.get("Status") != "Delete in progress":
        what = f"auto scaling group {name}"
        delete_policies(asg, name)
        gone = ["ValidationError"]  # what AWS answers for a group that no longer exists
        tolerating(gone, what, asg.update_auto_scaling_group,
                   AutoScalingGroupName=name, MinSize=0, DesiredCapacity=0)
        try:
            asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except Exception as exc:
            # a deletion already under way, or a scaling activity AWS finishes first: wait below
            if error_code(exc) not in ("ValidationError", "ScalingActivityInProgress", "ResourceInUse"):
                with aws_errors(BackendError, what):
                    raise
    return wait_until(lambda: find_scaling_group(asg, name) is None and not live_instances(ec2, name),
                      Backoff(timeout, sleep=sleep))


def find_launch_template(ec2: Any, name: str) -> dict[str, Any] | None:
    found = tolerating(
        ["InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound"],
        f"launch template {name}", ec2.describe_launch_templates, LaunchTemplateNames=[name])
    return dict(found["LaunchTemplates"][0]) if found and found["LaunchTemplates"] else None


def tagged_launch_templates(ec2: Any, tag: str, value: str) -> list[dict[str, Any]]:
    with aws_errors(BackendError, "launch templates"):
        return list(ec2.describe_launch_templates(
            Filters=[{"Name": f"tag:{tag}", "Values": [value]}])["LaunchTemplates"])


def delete_launch_template(ec2: Any, template_id: str) -> bool:
    """Delete it (one already gone counts). True."""
    tolerating(["InvalidLaunchTemplateId.NotFound", "InvalidLaunchTemplateName.NotFoundException"],
               f"launch template {template_id}", ec2.delete_launch_template,
               LaunchTemplateId=template_id)
    return True
