"""A fleet's HTTPS: the balancer's certificate in ACM and its two listeners.

By default the CLI signs a certificate for the balancer's DNS name with the user's CA
(``ca.py``) once that name is known, and imports it into ACM, tagged as the fleet's like its
other parts: no public CA certifies ``*.elb.amazonaws.com`` for us, and the CA is what clients
already trust for single servers. ``--certificate-arn`` names the user's own ACM certificate
instead (for a domain they point at the balancer); it is never imported, tagged or deleted.

The HTTPS listener (443, a TLS 1.2/1.3 policy) forwards to the replicas' target group; the
plain HTTP listener (``--lb-port``) only redirects to it, with a 301, so an ``http://`` link
still works but no request is served in the clear. The private key goes to ACM alone: nothing
else, not even Parameter Store, holds it.

An imported certificate is deleted after the listener that uses it (ACM refuses while a
listener still does, for a while after it is gone too, so deleting retries); a certificate
already gone counts as deleted, so ``stop`` can run again.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from plugins.aws import aws_errors
from plugins.backends.ec2.backoff import Backoff, Sleep, delete_when_free
from plugins.backends.ec2.balancer import elb_tag_list, tolerating
from plugins.backends.ec2.ca import IssuedCertificate
from plugins.backends.ec2.instances import tags_of
from studio_plugins import BackendError, ConfigurationError

HTTPS_PORT = 443
CERTIFICATE_DAYS = 397
"""How long the balancer's certificate is valid: a fleet runs until it is stopped, not for a
launch's ``--killafter``, and its key never leaves ACM (nothing can read it back), so the short
lifetime of an instance's certificate (``ca.SERVER_DAYS``) would only break it; 397 days is
what browsers accept of any server certificate."""
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
"""AWS's recommended policy: TLS 1.3 and 1.2 with forward-secret AEAD ciphers only."""
KEY_TYPES = ["RSA_1024", "RSA_2048", "RSA_3072", "RSA_4096", "EC_prime256v1", "EC_secp384r1",
             "EC_secp521r1"]
"""What ``list_certificates`` is asked for: by default it lists RSA 2048 certificates only,
and ours are EC P-256."""
_ARN = re.compile(r"arn:aws[a-z-]*:acm:([a-z0-9-]+):\d{12}:certificate/[A-Za-z0-9-]{1,128}")


def import_certificate(acm: Any, issued: IssuedCertificate, tags: dict[str, str]) -> str:
    """Import ``issued`` (key, certificate and the CA's as its chain), tagged; its ARN."""
    with aws_errors(BackendError, "the balancer's certificate (ACM)"):
        return str(acm.import_certificate(
            Certificate=issued.cert_pem, PrivateKey=issued.key_pem, CertificateChain=issued.ca_pem,
            Tags=elb_tag_list(tags),  # ACM takes the same characters in tag values as ELB
        )["CertificateArn"])


def check_own_certificate(acm: Any, arn: str, region: str) -> str:
    """``--certificate-arn``: it must be an ACM certificate in the fleet's region, issued; the
    domain it names (for the user to point at the balancer)."""
    match = _ARN.fullmatch(arn.strip())
    if not match:
        raise ConfigurationError(f"--certificate-arn {arn!r} is not an ACM certificate's ARN",
                                 hint="e.g. arn:aws:acm:us-east-1:123456789012:certificate/ID")
    if match.group(1) != region:
        raise ConfigurationError(
            f"--certificate-arn is in {match.group(1)}; a balancer in {region} can only use a "
            f"certificate from {region}", hint=f"import or request it in {region}, or pass --region")
    with aws_errors(BackendError, f"certificate {arn}", missing={
        "ResourceNotFoundException": (f"no certificate {arn} in ACM",
                                      "check --certificate-arn (`aws acm list-certificates`)"),
    }):
        found = acm.describe_certificate(CertificateArn=arn.strip())["Certificate"]
    if found.get("Status") != "ISSUED":
        raise ConfigurationError(f"certificate {arn} is {found.get('Status', 'not issued')}",
                                 hint="a balancer needs an issued certificate (validate it first)")
    return str(found.get("DomainName", ""))


def create_https_listener(elb: Any, balancer_arn: str, certificate_arn: str,
                          target_group_arn: str, tags: dict[str, str]) -> str:
    with aws_errors(BackendError, f"the HTTPS listener on port {HTTPS_PORT}"):
        listener = elb.create_listener(
            LoadBalancerArn=balancer_arn, Protocol="HTTPS", Port=HTTPS_PORT, SslPolicy=TLS_POLICY,
            Certificates=[{"CertificateArn": certificate_arn}],
            DefaultActions=[{"Type": "forward", "TargetGroupArn": target_group_arn}],
            Tags=elb_tag_list(tags),
        )["Listeners"][0]
    return str(listener["ListenerArn"])


def create_redirect_listener(elb: Any, balancer_arn: str, port: int, tags: dict[str, str]) -> str:
    """HTTP on ``port``: every request answered 301 with the same host, path and query on
    ``https://`` (443)."""
    with aws_errors(BackendError, f"a listener on port {port}"):
        listener = elb.create_listener(
            LoadBalancerArn=balancer_arn, Protocol="HTTP", Port=port,
            DefaultActions=[{"Type": "redirect", "RedirectConfig": {
                "Protocol": "HTTPS", "Port": str(HTTPS_PORT), "Host": "#{host}",
                "Path": "/#{path}", "Query": "#{query}", "StatusCode": "HTTP_301"}}],
            Tags=elb_tag_list(tags),
        )["Listeners"][0]
    return str(listener["ListenerArn"])


def tagged_certificates(acm: Any, tag: str, value: str) -> list[dict[str, Any]]:
    """Every certificate whose tag ``tag`` is ``value``, with its ``Tags`` as EC2 gives them
    (``tags_of``). A user's own certificate (``--certificate-arn``) carries none of ours."""
    found: list[dict[str, Any]] = []
    with aws_errors(BackendError, "certificates (ACM)"):
        for page in acm.get_paginator("list_certificates").paginate(
                Includes={"keyTypes": KEY_TYPES}):
            for summary in page["CertificateSummaryList"]:
                answer = tolerating(["ResourceNotFoundException"], "certificate tags",
                                    acm.list_tags_for_certificate,
                                    CertificateArn=summary["CertificateArn"])
                item = {**summary, "Tags": (answer or {}).get("Tags", [])}
                if answer is not None and tags_of(item).get(tag) == value:  # else: deleted meanwhile
                    found.append(item)
    return found


def delete_certificate(acm: Any, arn: str, timeout: float = 120.0, sleep: Sleep = time.sleep) -> bool:
    """Delete it, retrying while ACM still counts a listener being deleted as using it. True
    once it is gone."""
    with aws_errors(BackendError, f"certificate {arn}"):
        return delete_when_free(functools.partial(acm.delete_certificate, CertificateArn=arn),
                                gone="ResourceNotFoundException", in_use="ResourceInUseException",
                                backoff=Backoff(timeout, sleep=sleep))
