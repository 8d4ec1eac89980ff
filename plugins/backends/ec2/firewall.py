"""The server's security group: TCP ``--port`` (and ``--grpc-port``) from ``--cidr``, and 22 only
with a key pair.

Groups we create are tagged ``studio-plug:managed=true``. A group of ours in the same VPC whose
ingress is exactly what is asked (and whose egress is the default allow-all) is reused instead
of creating another; ``studio-plug stop`` deletes ours once no instance uses them.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from typing import Any

from plugins.aws import aws_errors
from plugins.backends.ec2.backoff import Backoff, delete_when_free
from plugins.backends.ec2.instances import tag_list
from studio_plugins import BackendError, ConfigurationError

MANAGED_TAG = "studio-plug:managed"

Rule = tuple[str, int, int, str]
"""(protocol, from port, to port, CIDR)."""


def normalise_cidr(cidr: str) -> str:
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError:
        raise ConfigurationError(
            f"--cidr {cidr!r} is not an address range", hint="e.g. 203.0.113.0/24 or 0.0.0.0/0"
        ) from None


def wanted_rules(port: int, cidr: str, ssh: bool, grpc_port: int | None = None) -> frozenset[Rule]:
    cidr = normalise_cidr(cidr)
    rules = {("tcp", port, port, cidr)}
    if grpc_port is not None:  # --grpc-port: the V2 gRPC service, from the same --cidr
        rules.add(("tcp", grpc_port, grpc_port, cidr))
    if ssh:
        rules.add(("tcp", 22, 22, cidr))
    return frozenset(rules)


def rules_of(permissions: list[dict[str, Any]]) -> frozenset[Rule]:
    """A group's permissions as rules; anything that is not a CIDR range makes it not ours to
    match (it then never equals a wanted set)."""
    rules: set[Rule] = set()
    for perm in permissions:
        protocol = str(perm.get("IpProtocol"))
        low, high = int(perm.get("FromPort", -1)), int(perm.get("ToPort", -1))
        for item in perm.get("IpRanges", []):
            rules.add((protocol, low, high, normalise_cidr(item["CidrIp"])))
        for item in perm.get("Ipv6Ranges", []):
            rules.add((protocol, low, high, normalise_cidr(item["CidrIpv6"])))
        for item in perm.get("UserIdGroupPairs", []) + perm.get("PrefixListIds", []):
            rules.add((protocol, low, high, f"other:{sorted(item.items())}"))
    return frozenset(rules)


DEFAULT_EGRESS = frozenset({("-1", -1, -1, "0.0.0.0/0")})


def _permissions(rules: frozenset[Rule]) -> list[dict[str, Any]]:
    permissions = []
    for protocol, low, high, cidr in sorted(rules):
        description = "ssh" if low == 22 and high == 22 else "studio-plug server"
        ranges = (
            {"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": description}]}
            if ":" in cidr
            else {"IpRanges": [{"CidrIp": cidr, "Description": description}]}
        )
        permissions.append({"IpProtocol": protocol, "FromPort": low, "ToPort": high, **ranges})
    return permissions


def find_group(ec2: Any, vpc_id: str, rules: frozenset[Rule]) -> str | None:
    with aws_errors(BackendError, "security groups"):
        groups = ec2.describe_security_groups(Filters=[
            {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ])["SecurityGroups"]
    for group in sorted(groups, key=lambda g: g["GroupId"]):
        ingress = rules_of(group.get("IpPermissions", []))
        egress = rules_of(group.get("IpPermissionsEgress", []))
        if ingress == rules and egress == DEFAULT_EGRESS:
            return str(group["GroupId"])
    return None


def create_group(ec2: Any, vpc_id: str, name: str, description: str,
                 permissions: list[dict[str, Any]], tags: dict[str, str]) -> str:
    """A new group, tagged as it is created (so that it is never there untagged, where
    ``ls``/``stop`` would not see it) and then opened by ``permissions``. When opening fails
    it is deleted again: a group that is not all there is not handed to the caller's undo."""
    with aws_errors(BackendError, f"security group {name}"):
        group_id = str(ec2.create_security_group(
            GroupName=name, Description=description, VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(tags)}],
        )["GroupId"])
    try:
        with aws_errors(BackendError, f"security group {group_id}"):
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=permissions)
    except BaseException:
        delete_group(ec2, group_id, timeout=0)
        raise
    return group_id


def ensure_group(
    ec2: Any, vpc_id: str, port: int, rules: frozenset[Rule], tags: dict[str, str]
) -> tuple[str, bool]:
    """A group of ours with exactly ``rules``: (group id, whether this call created it)."""
    existing = find_group(ec2, vpc_id, rules)
    if existing:
        return existing, False
    name = f"studio-plug-{port}-{secrets.token_hex(4)}"
    opened = ", ".join(f"{low} from {cidr}" for _, low, _, cidr in sorted(rules))
    group_id = create_group(ec2, vpc_id, name, f"studio-plug server: TCP {opened}",
                            _permissions(rules), {**tags, MANAGED_TAG: "true", "Name": name})
    return group_id, True


def delete_group(ec2: Any, group_id: str, timeout: float = 180.0) -> bool:
    """Delete a group, retrying while AWS still sees it in use (an instance shutting down).
    True when it is gone; False when it is not, whatever the reason: callers report what is
    left (and ``studio-plug stop --all`` retries), they do not stop at it."""
    try:
        return delete_when_free(functools.partial(ec2.delete_security_group, GroupId=group_id),
                                gone="InvalidGroup.NotFound", in_use="DependencyViolation",
                                backoff=Backoff(timeout, factor=2.0))
    except Exception:
        return False


def vpc_for(ec2: Any, subnet_id: str | None) -> str:
    """The VPC of ``--subnet-id``, else the region's default VPC."""
    with aws_errors(BackendError, "the VPC lookup", missing={
        "InvalidSubnetID.NotFound": (f"subnet {subnet_id} does not exist in this region",
                                     "check --subnet-id and --region"),
    }):
        if subnet_id:
            subnets = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
            return str(subnets[0]["VpcId"])
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise BackendError(
            "this region has no default VPC", hint="pass --subnet-id of a public subnet"
        )
    return str(vpcs[0]["VpcId"])
