"""Creating a planned fleet (``fleet.py``), each part undone again, newest first, if a later
one fails (or on Ctrl-C); on success it prints the balancer's URL, the fleet's name and the token."""

from __future__ import annotations

import time
from typing import Any

from plugins.backends.ec2.autoscaling import (
    create_launch_template,
    create_scaling_group,
    delete_launch_template,
    delete_policies,
    delete_scaling_group,
    put_request_policy,
    wait_in_service,
)
from plugins.backends.ec2.balancer import (
    HEALTH_PATH,
    Balancer,
    create_balancer,
    create_listener,
    create_target_group,
    delete_balancer,
    delete_listener,
    delete_target_group,
    resource_label,
    wait_active,
)
from plugins.backends.ec2.ca import CertificateAuthority
from plugins.backends.ec2.firewall import create_group, delete_group, normalise_cidr
from plugins.backends.ec2.fleet import FLEET_TAG, ROLE_TAG, FleetPlan, balancer_url, security_group_names
from plugins.backends.ec2.fleet_tls import (
    CERTIFICATE_DAYS,
    HTTPS_PORT,
    TLS_POLICY,
    create_https_listener,
    create_redirect_listener,
    delete_certificate,
    import_certificate,
)
from plugins.backends.ec2.plan import Undo, announce, await_ready, creating, say
from plugins.backends.ec2.spot import mixed_instances_policy


def create_security_group(
    ec2: Any, vpc_id: str, name: str, role: str, permissions: list[dict[str, Any]],
    tags: dict[str, str],
) -> str:
    return create_group(ec2, vpc_id, name, f"studio-plug fleet {tags[FLEET_TAG]}: {role}",
                        permissions, {**tags, "Name": name, ROLE_TAG: role})


def from_cidr(port: int, cidr: str, description: str) -> dict[str, Any]:
    cidr = normalise_cidr(cidr)
    ranges = ({"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": description}]} if ":" in cidr
              else {"IpRanges": [{"CidrIp": cidr, "Description": description}]})
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges}


def from_group(port: int, group_id: str, description: str) -> dict[str, Any]:
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
            "UserIdGroupPairs": [{"GroupId": group_id, "Description": description}]}


def https_listeners(fp: FleetPlan, undo: Undo, balancer: Balancer, target_group: str,
                    ca: CertificateAuthority | None) -> None:
    """The balancer's certificate (ours, signed for its DNS name and imported, unless
    --certificate-arn), the HTTPS listener forwarding to the replicas, and the HTTP listener
    redirecting to it; each undone again (the listeners before the certificate they use)."""
    c = fp.clients
    certificate = fp.certificate_arn
    if ca is not None:
        issued = ca.issue(dns_names=[balancer.dns_name], days=CERTIFICATE_DAYS)
        imported = import_certificate(c.acm, issued, fp.tags)
        undo.push(f"deleting certificate {imported}", lambda: delete_certificate(c.acm, imported))
        say(f"certificate {imported} (ACM): {balancer.dns_name}, signed by your CA, valid until "
            f"{issued.not_after:%Y-%m-%d}")
        certificate = imported
    assert certificate is not None  # a fleet with TLS has one or the other
    https = create_https_listener(c.elb, balancer.arn, certificate, target_group, fp.tags)
    undo.push(f"deleting listener on port {HTTPS_PORT}", lambda: delete_listener(c.elb, https))
    redirect = create_redirect_listener(c.elb, balancer.arn, fp.lb_port, fp.tags)
    undo.push(f"deleting listener on port {fp.lb_port}", lambda: delete_listener(c.elb, redirect))
    say(f"listeners: HTTPS {HTTPS_PORT} ({TLS_POLICY}) forwarding to {fp.name}; HTTP "
        f"{fp.lb_port} redirecting to it (301)")


def execute_fleet(fp: FleetPlan) -> int:
    base, c, name = fp.base, fp.clients, fp.name
    o, s = base.options, base.ec2_options
    deadline = time.monotonic() + s.launch_timeout
    # the user's CA (created on first use) before anything is created: it must be readable
    ca = CertificateAuthority.load_or_create() if fp.tls and not fp.certificate_arn else None
    with creating(base, readers="the replicas need", port=fp.lb_port) as undo:
        balancer_group, replica_group = security_group_names(name)
        lb_ports = [HTTPS_PORT, fp.lb_port] if fp.tls else [fp.lb_port]
        lb_group = create_security_group(
            c.ec2, base.vpc_id, balancer_group, "balancer",
            [from_cidr(port, s.cidr, "studio-plug fleet") for port in lb_ports], fp.tags)
        undo.push(f"deleting security group {lb_group}", lambda: delete_group(c.ec2, lb_group))
        say(f"security group {lb_group} (balancer): TCP {', '.join(map(str, lb_ports))} from "
            f"{normalise_cidr(s.cidr)}")
        permissions = [from_group(o.port, lb_group, "studio-plug balancer")]
        if s.key_name:
            permissions.append(from_cidr(22, s.cidr, "ssh"))
        sg = create_security_group(c.ec2, base.vpc_id, replica_group, "replicas", permissions, fp.tags)
        undo.push(f"deleting security group {sg}", lambda: delete_group(c.ec2, sg))
        say(f"security group {sg} (replicas): TCP {o.port} from the balancer's group only"
            + (f", 22 from {normalise_cidr(s.cidr)}" if s.key_name else ""))

        template = create_launch_template(
            c.ec2, name, image_id=base.image.image_id, instance_type=base.instance_type,
            user_data=base.user_data().render(), group_id=sg, key_name=s.key_name,
            iam_profile=s.iam_profile, tags=fp.tags)
        undo.push(f"deleting launch template {template}",
                  lambda: delete_launch_template(c.ec2, template))
        say(f"launch template {template} ({base.instance_type}, {base.image.image_id} "
            f"{base.image.name})")
        target_group = create_target_group(c.elb, name, base.vpc_id, o.port, fp.tags)
        undo.push(f"deleting target group {name}", lambda: delete_target_group(c.elb, target_group))
        say(f"target group {name}: HTTP {o.port}, health check {HEALTH_PATH}")
        balancer = create_balancer(c.elb, name, fp.subnets, lb_group, fp.tags)
        undo.push(f"deleting load balancer {name}", lambda: delete_balancer(c.elb, balancer.arn))
        say(f"load balancer {name}: {balancer.dns_name} in {len(fp.subnets)} availability zones")
        if fp.tls:
            https_listeners(fp, undo, balancer, target_group, ca)
        else:
            listener = create_listener(c.elb, balancer.arn, fp.lb_port, target_group, fp.tags)
            undo.push(f"deleting listener on port {fp.lb_port}",
                      lambda: delete_listener(c.elb, listener))

        create_scaling_group(
            c.asg, name, template_id=template, subnets=fp.replica_subnets, sizes=fp.sizes,
            target_group_arn=target_group, grace=s.launch_timeout, tags=fp.tags,
            mixed=mixed_instances_policy(template, fp.spot_types, fp.on_demand_base, s.bid)
            if s.spot else None)
        undo.push(f"deleting auto scaling group {name} and its instances",
                  lambda: delete_scaling_group(c.asg, c.ec2, name))
        sizes = fp.sizes
        say(f"auto scaling group {name}: {sizes.desired} x {base.instance_type} in "
            f"{len(fp.replica_subnets)} zones" + (f", scaling {sizes.minimum}-{sizes.maximum}"
                                                  if sizes.scales else ""))
        if s.spot:
            say(f"spot: {fp.on_demand_base} on-demand, the rest spot, on "
                f"{', '.join(fp.spot_types)}; capacity rebalancing on")
        if fp.target_rps is not None:
            policy = put_request_policy(c.asg, name, resource_label(balancer.arn, target_group),
                                        fp.target_rps)
            undo.push(f"deleting scaling policy {policy}", lambda: delete_policies(c.asg, name))
            say(f"scaling policy {policy}: {fp.target_rps:g} requests/s per instance "
                f"({fp.target_rps * 60:g} per minute, as the metric counts)")

        say(f"waiting for the balancer and {sizes.desired} instance(s) "
            f"(at most {s.launch_timeout:g} s)")
        wait_active(c.elb, balancer.arn, max(deadline - time.monotonic(), 1.0))
        wait_in_service(c.asg, name, sizes.desired, max(deadline - time.monotonic(), 1.0))
        url = balancer_url(balancer.dns_name, fp.lb_port, https=fp.tls)
        await_ready(base, url, max(deadline - time.monotonic(), 1.0),
                    cafile=str(ca.cert_file) if ca else None,
                    check_hostname=not fp.certificate_arn)  # the user's names their domain
    announce(base, url, f"fleet: {name} ({sizes.desired} x {base.instance_type} in {base.region}"
             + (f", {sizes.minimum}-{sizes.maximum} at {fp.target_rps:g} req/s each"
                if sizes.scales else "") + ")")
    if ca is not None:
        say(f"HTTPS with a certificate from your CA (the Python client trusts it by itself): "
            f"curl --cacert {ca.cert_file} {url}v2/health/ready")
    elif fp.certificate_arn:
        say(f"HTTPS with your certificate for {fp.certificate_domain or '?'}: point that name at "
            f"{balancer.dns_name} (a CNAME or an alias record) and use https://"
            f"{fp.certificate_domain or 'YOUR-DOMAIN'}/")
    say(f"the fleet bills (instances and the load balancer) until you stop it: "
        f"`studio-plug stop {name} --region {base.region}`")
    return 0
