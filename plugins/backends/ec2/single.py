"""``--cloud ec2``: serve on a new EC2 instance that runs the same ``studio-plug serve`` command.

The plan (``plan.py``) is made first. Then the wrapper is uploaded, the security group found or
created and the instance started, each undone again, newest first, if a later step fails (or
on Ctrl-C). On success it prints the URL, the instance id and the token and exits 0; the
instance terminates itself once ``serve`` exits (``--killafter``).
"""

from __future__ import annotations

from typing import Any

from plugins.aws import aws_errors
from plugins.backends.ec2.ca import CertificateAuthority
from plugins.backends.ec2.firewall import delete_group, ensure_group, wanted_rules
from plugins.backends.ec2.instances import KEY_TAG, STARTED_BY_TAG, tag_list, wait_for_address
from plugins.backends.ec2.inventory import terminate
from plugins.backends.ec2.parameters import tls_value
from plugins.backends.ec2.plan import Plan, announce, await_ready, creating, say
from plugins.backends.ec2.spot import market_options
from studio_plugins import BackendError


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
    if s.spot:
        kwargs["InstanceMarketOptions"] = market_options(s)
    with aws_errors(BackendError, f"a {plan.instance_type} instance for {','.join(o.keys)}"):
        response = plan.ec2.run_instances(**kwargs)
    return str(response["Instances"][0]["InstanceId"])


def execute(plan: Plan) -> int:
    o, s, ec2 = plan.options, plan.ec2_options, plan.ec2
    # the user's CA (created on first use) before anything is created: it must be readable
    ca = CertificateAuthority.load_or_create() if plan.tls_parameter and not plan.own_tls else None
    with creating(plan, readers="the instance needs", port=o.port) as undo:
        rules = wanted_rules(o.port, s.cidr, ssh=bool(s.key_name), grpc_port=o.grpc_port)
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
        if ca is not None and plan.tls_parameter:  # the instance waits for it at boot
            issued = ca.issue(ip_addresses=[address])
            plan.put_parameter(undo, plan.tls_parameter, tls_value(
                {"cert.pem": issued.chain_pem, "key.pem": issued.key_pem}))
        url = f"{'https' if plan.tls else 'http'}://{address}:{o.port}/"
        cafile = str(ca.cert_file) if ca else None
        await_ready(plan, url, s.launch_timeout, cafile=cafile)
    announce(plan, url, f"instance: {instance_id} ({plan.instance_type} in {plan.region})")
    if o.grpc_port is not None:
        say(f"V2 over gRPC on {address}:{o.grpc_port}"
            + (" (TLS, the same certificate as HTTPS)" if plan.tls else "")
            + ("; the token goes in 'authorization: Bearer' metadata" if plan.token else ""))
    if cafile:
        say(f"HTTPS with a certificate from your CA (the Python client trusts it by itself): "
            f"curl --cacert {cafile} {url}v2/health/ready")
    say(f"it stops itself after {o.killafter:g} s without requests; now: "
        f"`studio-plug stop {instance_id} --region {plan.region}`")
    return 0
