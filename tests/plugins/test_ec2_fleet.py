"""``serve --cloud ec2 --replicas N``: a fleet behind a load balancer, against moto's server.

What these tests prove: the AWS resources a fleet launch creates exist and are wired to each
other as AWS would need them (the launch template's user data is the single-instance script with
``--killafter 0``, the S3 store and the token; the target group on ``--port`` with the
``/v2/health/ready`` health check; the HTTPS listener on 443 forwarding to it with a certificate
for the balancer's DNS name that the user's CA verifies, imported into ACM, and the HTTP listener
on ``--lb-port`` redirecting to it (``--no-tls``: one HTTP listener forwarding); the group in
the default VPC's subnets attached to the target group; the scaling policy measuring that
balancer's target group; the security groups' rules), that the group starts N tagged instances,
that a failure after the balancer exists removes everything (the imported certificate too),
that ``--certificate-arn`` uses the user's certificate and imports none, and that the template's
serve command really serves the experiment with the fleet's token and ships a per-model wrapper beside
the common one as a single instance does (run here, against moto's S3).

What they cannot prove: moto runs no health checks (every target reports ``healthy`` at once),
routes no traffic through the balancer (so no TLS handshake with it: the certificate is checked
as ACM holds it, and ``--wait-ready`` against a local stand-in at the balancer's name), never
scales on the policy, and puts every replica in the first subnet. Nor does it refuse to delete a
security group still in use, so the order of deletion is checked from what ``stop`` prints, not
from AWS refusing a wrong one.
"""

from __future__ import annotations

import base64
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from plugins.backends.ec2.userdata import serve_lines
from studio_plugins import __version__
from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from studio_plugins.tls import user_ca_file
from tests.plugins.test_ec2_backend import (
    MOTO_DLAMI,
    check_two_wrappers_shipped,
    cli,
    run_user_data_locally,
    two_wrappers,
)

STORE = "s3://models/prod"  # the fleet_cloud fixture (tests/conftest.py) pushed "exp" here
ARN = "arn:aws:acm:us-east-1:123456789012:certificate/0b4e4a4e-1111-2222-3333-444455556666"
"""A certificate's ARN that moto's ACM does not hold."""


def launch_fleet(*args: str, key: str = "exp") -> tuple[int, str, str]:
    return cli("serve", key, "--cloud", "ec2", "--store", STORE, *args)


def launched_fleet(stdout: str) -> tuple[str, str, str | None]:
    """(url, fleet name, token) from what a successful launch printed."""
    lines = stdout.splitlines()
    name = lines[1].removeprefix("fleet: ").split()[0]
    token = lines[2].removeprefix("token: ") if len(lines) > 2 else None
    return lines[0], name, token


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def elb_tags(aws: SimpleNamespace, arn: str) -> dict[str, str]:
    return tags(aws.elb.describe_tags(ResourceArns=[arn])["TagDescriptions"][0])


def template_user_data(aws: SimpleNamespace, template_id: str) -> str:
    version = aws.ec2.describe_launch_template_versions(
        LaunchTemplateId=template_id, Versions=["$Latest"])["LaunchTemplateVersions"][0]
    return base64.b64decode(version["LaunchTemplateData"]["UserData"]).decode()


def fleet_instances(aws: SimpleNamespace, name: str) -> list[dict[str, Any]]:
    reservations = aws.ec2.describe_instances(Filters=[
        {"Name": "tag:studio-plug:fleet", "Values": [name]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ])["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def leftovers(aws: SimpleNamespace) -> dict[str, list[str]]:
    """Every resource a fleet can create that still exists (moto is reset per test, so anything
    here was created by the test), by kind; empty when nothing is left. Listeners are the
    balancers' (none can exist without one)."""
    found: dict[str, list[str]] = {
        "auto scaling groups": [g["AutoScalingGroupName"]
                                for g in aws.asg.describe_auto_scaling_groups()["AutoScalingGroups"]],
        "scaling policies": [p["PolicyName"] for p in aws.asg.describe_policies()["ScalingPolicies"]],
        "launch templates": [t["LaunchTemplateName"]
                             for t in aws.ec2.describe_launch_templates()["LaunchTemplates"]],
        "target groups": [g["TargetGroupName"] for g in aws.elb.describe_target_groups()["TargetGroups"]],
        "load balancers": [b["LoadBalancerName"]
                           for b in aws.elb.describe_load_balancers()["LoadBalancers"]],
        "certificates": [c["CertificateArn"] for c in acm().list_certificates(
            Includes={"keyTypes": ["EC_prime256v1", "RSA_2048"]})["CertificateSummaryList"]],
        "security groups": [g["GroupName"] for g in aws.ec2.describe_security_groups()["SecurityGroups"]
                            if g["GroupName"] != "default"],
        "parameters": [p["Name"] for p in ssm().describe_parameters()["Parameters"]],
        "instances": [i["InstanceId"] for r in aws.ec2.describe_instances(Filters=[
            {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopped"]},
        ])["Reservations"] for i in r["Instances"]],
    }
    return {kind: names for kind, names in found.items() if names}


def listeners_of(aws: SimpleNamespace, name: str) -> list[dict[str, Any]]:
    """The balancer's listeners, by port."""
    balancer = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"][0]
    found = aws.elb.describe_listeners(LoadBalancerArn=balancer["LoadBalancerArn"])["Listeners"]
    return sorted(found, key=lambda listener: listener["Port"])


def ssm() -> Any:
    import boto3

    return boto3.client("ssm")  # moto's, as acm()


def acm() -> Any:
    import boto3

    return boto3.client("acm")  # moto's, through the environment the aws fixture set


def redirect_to_https(port: int) -> dict[str, Any]:
    """What the HTTP listener on ``port`` does when the balancer serves HTTPS."""
    return {"Type": "redirect", "RedirectConfig": {
        "Protocol": "HTTPS", "Port": "443", "Host": "#{host}", "Path": "/#{path}",
        "Query": "#{query}", "StatusCode": "HTTP_301"}}


def check_certificate_for(arn: str, dns_name: str) -> dict[str, str]:
    """The imported certificate names ``dns_name`` (and nothing else) and verifies, for that
    name, against the user's CA, as a client that trusts only the CA would check it; its tags."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    from studio_plugins.tls import user_ca_file

    stored = acm().get_certificate(CertificateArn=arn)
    leaf = x509.load_pem_x509_certificate(stored["Certificate"].encode())
    ca = x509.load_pem_x509_certificate(user_ca_file().read_bytes())
    # the chain given is the CA's (moto, like ACM, answers it with an Amazon root appended)
    assert stored["CertificateChain"].startswith(user_ca_file().read_text())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [dns_name]
    assert san.get_values_for_type(x509.IPAddress) == []
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc  # the fleet runs until stopped
    assert 396 <= lifetime.days <= 397
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(dns_name))
    verifier.verify(leaf, [])  # raises when the CA does not vouch for it under that name
    with pytest.raises(VerificationError):  # and for that name only
        PolicyBuilder().store(Store([ca])).build_server_verifier(
            x509.DNSName("other." + dns_name)).verify(leaf, [])
    return tags(acm().list_tags_for_certificate(CertificateArn=arn))


def permissions(group: dict[str, Any]) -> set[tuple[int, str]]:
    """(port, source) of each ingress rule: a CIDR or a group id."""
    rules = set()
    for perm in group["IpPermissions"]:
        rules |= {(perm["FromPort"], r["CidrIp"]) for r in perm["IpRanges"]}
        rules |= {(perm["FromPort"], g["GroupId"]) for g in perm["UserIdGroupPairs"]}
    return rules


# --- what a launch creates, and how it is wired ------------------------------------------------


def test_a_scaling_fleet_is_wired_template_to_group_to_balancer(fleet_cloud) -> None:
    aws = fleet_cloud
    code, out, err = launch_fleet(
        "--min-replicas", "2", "--max-replicas", "4", "--target-rps", "5", "--port", "8080",
        "--lb-port", "8000", "--cidr", "203.0.113.0/24", "--key-name", "mine",
        "--iam-profile", "reader", "--fleet-name", "exp-prod", "--killafter", "600")
    assert code == 0, err
    url, name, token = launched_fleet(out)
    assert name == "exp-prod"
    assert out.splitlines()[1] == "fleet: exp-prod (2 x m5.large in us-east-1, 2-4 at 5 req/s each)"
    assert token and len(token) >= 24
    assert "studio-plug stop exp-prod --region us-east-1" in err

    # the balancer: internet-facing, in every default subnet, behind its own security group
    (balancer,) = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"]
    assert url == f"https://{balancer['DNSName']}/"
    assert balancer["Scheme"] == "internet-facing" and balancer["Type"] == "application"
    vpc = aws.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    zones = {s["AvailabilityZone"]: s["SubnetId"] for s in aws.ec2.describe_subnets(Filters=[
        {"Name": "vpc-id", "Values": [vpc]}, {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]}
    assert {z["SubnetId"] for z in balancer["AvailabilityZones"]} == set(zones.values())
    (lb_group_id,) = balancer["SecurityGroups"]

    # the target group: --port, HTTP, health check /v2/health/ready on the traffic port
    (target_group,) = aws.elb.describe_target_groups(Names=[name])["TargetGroups"]
    assert (target_group["Protocol"], target_group["Port"], target_group["VpcId"]) == ("HTTP", 8080, vpc)
    assert target_group["HealthCheckPath"] == "/v2/health/ready"
    assert target_group["HealthCheckPort"] == "traffic-port"
    assert target_group["Matcher"] == {"HttpCode": "200"}
    assert target_group["LoadBalancerArns"] == [balancer["LoadBalancerArn"]]

    # the listeners: HTTPS on 443 forwarding everything to that target group, with the
    # certificate imported for the balancer's name; --lb-port redirecting there
    listener, redirect = listeners_of(aws, name)
    assert (listener["Protocol"], listener["Port"]) == ("HTTPS", 443)
    assert listener["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    forward = {"Type": "forward", "TargetGroupArn": target_group["TargetGroupArn"]}
    assert listener["DefaultActions"] == [forward]
    (certificate,) = listener["Certificates"]
    (imported,) = [c["CertificateArn"] for c in acm().list_certificates(
        Includes={"keyTypes": ["EC_prime256v1"]})["CertificateSummaryList"]]
    assert certificate["CertificateArn"] == imported
    certificate_tags = check_certificate_for(imported, balancer["DNSName"])
    assert f"certificate {imported} (ACM): {balancer['DNSName']}" in err
    assert f"curl --cacert {user_ca_file()} {url}v2/health/ready" in err
    assert (redirect["Protocol"], redirect["Port"]) == ("HTTP", 8000)
    assert redirect["DefaultActions"] == [redirect_to_https(8000)]

    # the group: the template, the default subnets, the target group, ELB health checks
    (group,) = aws.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    (template,) = aws.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    assert group["LaunchTemplate"]["LaunchTemplateId"] == template["LaunchTemplateId"]
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (2, 2, 4)
    # ... only where m5.large is offered: moto, like AWS, has none in us-east-1e
    offered = {o["Location"] for o in aws.ec2.describe_instance_type_offerings(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": ["m5.large"]}])["InstanceTypeOfferings"]}
    assert "us-east-1e" in zones and "us-east-1e" not in offered
    assert set(group["VPCZoneIdentifier"].split(",")) == {zones[z] for z in offered}
    assert group["TargetGroupARNs"] == [target_group["TargetGroupArn"]]
    assert group["HealthCheckType"] == "ELB" and group["HealthCheckGracePeriod"] == 900

    # the policy: requests per target of exactly this balancer's target group, per minute
    (policy,) = aws.asg.describe_policies(AutoScalingGroupName=name)["ScalingPolicies"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    tracking = policy["TargetTrackingConfiguration"]
    metric = tracking["PredefinedMetricSpecification"]
    assert metric["PredefinedMetricType"] == "ALBRequestCountPerTarget"
    balancer_part = balancer["LoadBalancerArn"].split(":loadbalancer/")[1]
    group_part = target_group["TargetGroupArn"].split(":")[-1]
    assert metric["ResourceLabel"] == f"{balancer_part}/{group_part}"
    assert tracking["TargetValue"] == 300.0  # 5 requests/s = 300 per minute

    # the template: same AMI/type/profile as a single instance, the replicas' group, user data
    data = aws.ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert (data["ImageId"], data["InstanceType"]) == (MOTO_DLAMI, "m5.large")
    assert data["KeyName"] == "mine" and data["IamInstanceProfile"] == {"Name": "reader"}
    (replica_group_id,) = data["SecurityGroupIds"]
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    script = template_user_data(aws, template["LaunchTemplateId"])
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, timeout=10)
    assert syntax.returncode == 0, syntax.stderr
    assert "shutdown -h now' EXIT" in script
    assert f"/wheels/studio_plugins-{__version__}-py3-none-any.whl[all]" in script  # shipped
    assert token and token not in script  # the replicas read it from SSM at boot
    (line,) = serve_lines(script)
    argv = shlex.split(line)
    assert argv[:3] == ["studio-plug", "serve", "exp"]
    assert argv[argv.index("--store") + 1] == STORE
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8080"
    assert argv[argv.index("--killafter") + 1] == "0"  # the group owns the replicas' lifetime
    assert token not in line

    # the firewall: the world (--cidr) reaches the balancer only; the replicas only from it
    groups = {g["GroupId"]: g for g in aws.ec2.describe_security_groups(
        GroupIds=[lb_group_id, replica_group_id])["SecurityGroups"]}
    assert permissions(groups[lb_group_id]) == {(443, "203.0.113.0/24"), (8000, "203.0.113.0/24")}
    assert permissions(groups[replica_group_id]) == {(8080, lb_group_id), (22, "203.0.113.0/24")}

    # everything is tagged as the fleet's
    expected = {"studio-plug:managed": "fleet", "studio-plug:fleet": name, "studio-plug:key": "exp",
                "studio-plug:port": "8080", "studio-plug:lb-port": "8000", "studio-plug:store": STORE}
    for resource_tags in (elb_tags(aws, balancer["LoadBalancerArn"]),
                          elb_tags(aws, target_group["TargetGroupArn"]),
                          elb_tags(aws, listener["ListenerArn"]), elb_tags(aws, redirect["ListenerArn"]),
                          certificate_tags,
                          tags(group), tags(template), *(tags(g) for g in groups.values())):
        assert expected.items() <= resource_tags.items()

    # the replicas: as many as desired, each in the replicas' group, tagged
    instances = fleet_instances(aws, name)
    assert len(instances) == 2
    for instance in instances:
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [replica_group_id]
        assert expected.items() <= tags(instance).items()
    targets = aws.elb.describe_target_health(TargetGroupArn=target_group["TargetGroupArn"])
    assert {t["Target"]["Id"] for t in targets["TargetHealthDescriptions"]} == {
        i["InstanceId"] for i in instances}


def test_replicas_n_gives_n_tagged_instances_under_a_generated_name(fleet_cloud) -> None:
    aws = fleet_cloud
    code, out, err = launch_fleet("--replicas", "3", "--no-auth")
    assert code == 0, err
    url, name, token = launched_fleet(out)
    assert re.fullmatch(r"exp-[a-z]+-[a-z]+", name), name
    assert token is None and "warning: --no-auth" in err
    (balancer,) = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"]
    assert url == f"https://{balancer['DNSName']}/"
    assert [(li["Port"], li["Protocol"]) for li in listeners_of(aws, name)] == [(80, "HTTP"), (443, "HTTPS")]
    assert listeners_of(aws, name)[0]["DefaultActions"] == [redirect_to_https(80)]  # --lb-port 80
    (group,) = aws.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (3, 3, 3)
    assert aws.asg.describe_policies(AutoScalingGroupName=name)["ScalingPolicies"] == []
    instances = fleet_instances(aws, name)
    assert len(instances) == 3
    assert all(tags(i)["studio-plug:fleet"] == name for i in instances)
    assert all(tags(i)["studio-plug:managed"] == "fleet" for i in instances)
    (template,) = aws.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    assert "STUDIO_TOKEN" not in template_user_data(aws, template["LaunchTemplateId"])
    replicas = aws.ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [f"{name}-replicas"]}])["SecurityGroups"][0]
    assert {port for port, _ in permissions(replicas)} == {5000}  # no 22 without --key-name

    # a second fleet of the same experiment gets another name; the name cannot be reused
    code, out, err = launch_fleet("--replicas", "1")
    assert code == 0, err
    assert launched_fleet(out)[1] != name
    code, _out, err = launch_fleet("--replicas", "1", "--fleet-name", name)
    assert code == 1
    assert f"something named {name!r} exists already" in err and f"studio-plug stop {name}" in err


@pytest.mark.parametrize(("args", "message"), [
    (("--replicas", "2", "--max-replicas", "3"), "--replicas fixes the size"),
    (("--replicas", "2", "--target-rps", "5"), "--target-rps needs room to scale"),
    (("--min-replicas", "2"), "--min-replicas needs --max-replicas"),
    (("--min-replicas", "3", "--max-replicas", "2", "--target-rps", "5"), "is more than --max-replicas"),
    (("--max-replicas", "3"), "nothing would scale the fleet"),
    (("--target-rps", "5"), "--target-rps only applies to a fleet"),
    (("--lb-port", "8000"), "--lb-port only applies to a fleet"),
    (("--replicas", "2", "--fleet-name", "Bad_Name"), "--fleet-name 'Bad_Name' cannot name"),
    (("--replicas", "2", "--fleet-name", "i-0123456789abcdef0"), "cannot name a load balancer"),
    (("--replicas", "2", "--subnet-id", "subnet-1"), "--subnet-id is for a single instance"),
    (("--replicas", "2", "--port", "0"), "fixed --port"),
    (("--replicas", "2", "--grpc-port", "8001"), "a fleet's balancer forwards HTTP only"),
    (("--certificate-arn", ARN), "--certificate-arn only applies to a fleet"),
    (("--replicas", "2", "--no-tls", "--certificate-arn", ARN), "--no-tls and --certificate-arn"),
    (("--replicas", "2", "--lb-port", "443"), "--lb-port 443 is the HTTPS listener's"),
    (("--replicas", "2", "--certificate-arn", "mine"), "'mine' is not an ACM certificate's ARN"),
    (("--replicas", "2", "--certificate-arn", ARN.replace("us-east-1", "eu-west-1")),
     "a balancer in us-east-1 can only use a certificate from us-east-1"),
    (("--replicas", "2", "--certificate-arn", ARN), "no certificate arn:aws:acm:us-east-1"),
])
def test_refusals_before_anything_is_created(fleet_cloud, args: tuple[str, ...], message: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from plugins.backends.ec2 import plan

    built: list[object] = []  # building the wheels takes seconds: never for a refused launch
    monkeypatch.setattr(plan, "build_shipment", lambda *a: built.append(a) or plan.Shipment((), ()))
    code, _out, err = launch_fleet(*args)
    assert code == 1, err
    assert message in err
    assert leftovers(fleet_cloud) == {} and built == []


# --- HTTPS: the user's own certificate, or none ------------------------------------------------


def test_certificate_arn_puts_the_users_certificate_on_the_balancer_and_imports_none(
    fleet_cloud, tmp_path: Path
) -> None:
    from plugins.backends.ec2.ca import CertificateAuthority

    aws = fleet_cloud
    theirs = CertificateAuthority.load_or_create(tmp_path / "their-ca").issue(
        dns_names=["models.example.com"])
    own = acm().import_certificate(Certificate=theirs.cert_pem, PrivateKey=theirs.key_pem,
                                   CertificateChain=theirs.ca_pem)["CertificateArn"]
    code, out, err = launch_fleet("--replicas", "1", "--certificate-arn", own, "--fleet-name", "own")
    assert code == 0, err
    url, name, _token = launched_fleet(out)
    (balancer,) = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"]
    assert url == f"https://{balancer['DNSName']}/"
    redirect, listener = listeners_of(aws, name)
    assert (listener["Protocol"], listener["Port"]) == ("HTTPS", 443)
    assert listener["Certificates"] == [{"CertificateArn": own}]
    assert redirect["DefaultActions"] == [redirect_to_https(80)]
    assert leftovers(aws)["certificates"] == [own]  # nothing imported
    assert "certificate arn:" not in err and "--cacert" not in err
    assert f"point that name at {balancer['DNSName']}" in err and "models.example.com" in err

    code, _out, err = cli("stop", name)  # the user's certificate is theirs to keep
    assert code == 0, err
    assert "deleting certificate" not in err
    assert leftovers(aws) == {"certificates": [own]}


def test_no_tls_keeps_one_plain_http_listener(fleet_cloud) -> None:
    aws = fleet_cloud
    code, out, err = launch_fleet("--replicas", "1", "--no-tls", "--lb-port", "8000")
    assert code == 0, err
    assert "warning: --no-tls" in err
    url, name, _token = launched_fleet(out)
    (balancer,) = aws.elb.describe_load_balancers(Names=[name])["LoadBalancers"]
    assert url == f"http://{balancer['DNSName']}:8000/"
    (listener,) = listeners_of(aws, name)
    (target_group,) = aws.elb.describe_target_groups(Names=[name])["TargetGroups"]
    assert (listener["Protocol"], listener["Port"]) == ("HTTP", 8000)
    assert listener["DefaultActions"] == [{"Type": "forward",
                                           "TargetGroupArn": target_group["TargetGroupArn"]}]
    (lb_group,) = balancer["SecurityGroups"]
    group = aws.ec2.describe_security_groups(GroupIds=[lb_group])["SecurityGroups"][0]
    assert permissions(group) == {(8000, "0.0.0.0/0")}  # no 443
    assert "certificates" not in leftovers(aws)
    code, listed, err = cli("ls")
    assert code == 0, err
    assert url in listed.split()


class BalancerStandIn:
    """What moto's balancer cannot be: something that answers at its DNS name. A local HTTPS
    server answers ``/v2/health/ready`` with 200 and presents, for whatever name the client
    asks for (SNI), a certificate that ``signer`` (a ``CertificateAuthority``) issues; the
    launch's connections to a balancer's name on 443 are sent here instead."""

    def __init__(self, signer: Any, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import http.server
        import socket
        import ssl
        import threading

        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/v2/health/ready" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.names: list[str] = []

        def for_name(sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
            if not name:
                return
            self.names.append(name)
            issued = signer.issue(dns_names=[name])
            (directory / "chain.pem").write_bytes(issued.chain_pem)
            (directory / "key.pem").write_bytes(issued.key_pem)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
            sock.context = context

        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.sni_callback = for_name  # type: ignore[assignment]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
        self.server.socket = base.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        here = ("127.0.0.1", self.server.server_address[1])
        real = socket.create_connection

        def redirected(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
            to_balancer = str(address[0]).endswith(".elb.amazonaws.com") and address[1] == 443
            return real(here if to_balancer else address, *args, **kwargs)

        monkeypatch.setattr(socket, "create_connection", redirected)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(90)
def test_wait_ready_checks_the_balancer_against_the_users_ca(
    fleet_cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.backends.ec2.ca import CertificateAuthority

    # a stand-in whose certificate another CA signed (as a balancer not ours would present)
    # is not ready: the launch gives up and removes everything, its certificate too
    (tmp_path / "other").mkdir()
    impostor = BalancerStandIn(CertificateAuthority.load_or_create(tmp_path / "other-ca"),
                               tmp_path / "other", monkeypatch)
    try:
        code, _out, err = launch_fleet("--replicas", "1", "--wait-ready", "--launch-timeout", "4",
                                       "--fleet-name", "impostor")
    finally:
        impostor.close()
    assert code == 1
    assert impostor.names and impostor.names[0].startswith("impostor-")  # it was asked
    assert "was not ready after" in err and "CERTIFICATE_VERIFY_FAILED" in err
    assert leftovers(fleet_cloud) == {}

    # one with a certificate from the user's CA for the balancer's name is
    (tmp_path / "ours").mkdir()
    ours = BalancerStandIn(CertificateAuthority.load_or_create(), tmp_path / "ours", monkeypatch)
    try:
        code, out, err = launch_fleet("--replicas", "1", "--wait-ready", "--launch-timeout", "30",
                                       "--fleet-name", "ready")
    finally:
        ours.close()
    assert code == 0, err
    url, name, _token = launched_fleet(out)
    (balancer,) = fleet_cloud.elb.describe_load_balancers(Names=[name])["LoadBalancers"]
    assert url == f"https://{balancer['DNSName']}/" and ours.names == [balancer["DNSName"]]
    assert "booting:" not in err


# --- failures after something was created remove all of it -------------------------------------


@pytest.mark.filterwarnings("ignore:Exception\\(InvalidKeyPairNameError\\):UserWarning")  # moto's own
def test_a_failure_after_the_balancer_was_created_leaves_nothing(
    fleet_cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto import settings

    # moto checks key pairs as EC2 does when the group launches its instances: the group is
    # refused after the groups, template, target group, balancer and listener exist
    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", True)
    code, out, err = launch_fleet("--replicas", "2", "--key-name", "no-such-key", "--fleet-name",
                                  "exp-broken")
    assert code == 1 and out == ""
    assert "InvalidKeyPair.NotFound" in err
    listener = re.search(r"listener on port (\d+)", err)
    assert listener, err
    cleaning = [line.removeprefix("cleaning up: ") for line in err.splitlines()
                if line.startswith("cleaning up: ")]
    assert [re.sub(r"(sg|lt)-[0-9a-f]+|wheels/[0-9a-f]{64}/.*|(?<=/studio-plug/)[0-9a-f]+"
                   r"|(?<=certificate/)[0-9a-f-]+", r"\1-",
                   line) for line in cleaning] == [
        "deleting listener on port 80",
        "deleting listener on port 443",
        "deleting certificate arn:aws:acm:us-east-1:123456789012:certificate/-",
        "deleting load balancer exp-broken",
        "deleting target group exp-broken",
        "deleting launch template lt-",
        "deleting security group sg-",  # the replicas' (it refers to the balancer's)
        "deleting security group sg-",
        "deleting parameter /studio-plug/-/token",  # the token, in Parameter Store
        "deleting s3://models/prod/-",  # the wheel of studio-plugins this launch uploaded
    ]
    assert leftovers(fleet_cloud) == {}


@pytest.mark.timeout(60)
def test_a_failure_after_the_group_started_removes_the_instances_too(fleet_cloud) -> None:
    # the balancer's name does not resolve from here: --wait-ready times out with the whole
    # fleet up, instances and policy included
    code, _out, err = launch_fleet("--min-replicas", "1", "--max-replicas", "3", "--target-rps", "2",
                                   "--wait-ready", "--launch-timeout", "3")
    assert code == 1
    assert "was not ready after" in err
    assert "cleaning up: deleting auto scaling group" in err
    assert leftovers(fleet_cloud) == {}


# --- the template's command really serves ------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_template_command_serves_the_experiment_with_the_fleet_token(
    fleet_cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a common wrapper and one model's own ship to every replica as to a single instance
    code, out, err = launch_fleet("--replicas", "2", *two_wrappers(tmp_path))
    assert code == 0, err
    _url, name, token = launched_fleet(out)
    (template,) = fleet_cloud.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    script = template_user_data(fleet_cloud, template["LaunchTemplateId"])
    check_two_wrappers_shipped(script, token, monkeypatch, killafter=0.0)
    workdir = tmp_path / "replica"
    workdir.mkdir()
    argv, env = run_user_data_locally(script, workdir)
    assert argv[argv.index("--killafter") + 1] == "0"
    assert env["STUDIO_TOKEN"] == token
    with ServerProcess(*argv, env=env) as server:
        x = np.array([[1.0, 2.0, 3.0]], np.float32)
        np.testing.assert_allclose(predict(server.url, {"x": x}, token=token)["x"], x @ fleet_cloud.weights)
        twice = predict(f"{server.url}models/twice", {"x": x}, token=token)["x"]
        np.testing.assert_allclose(twice, 2 * (x @ fleet_cloud.weights))
        with pytest.raises(PredictionError) as caught:
            predict(server.url, {"x": x})
        assert caught.value.status == 401


def test_balancer_tags_keep_to_what_elb_accepts() -> None:
    from plugins.backends.ec2.balancer import elb_tag_list

    assert elb_tag_list({"studio-plug:key": "exp,other", "studio-plug:store": "s3://b/p-1_x",
                         "studio-plug:started-by": "me@host"}) == [
        {"Key": "studio-plug:key", "Value": "exp other"},  # ELB refuses commas in tag values
        {"Key": "studio-plug:store", "Value": "s3://b/p-1_x"},
        {"Key": "studio-plug:started-by", "Value": "me@host"},
    ]
