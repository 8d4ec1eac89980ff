"""The ``serve`` options only ``--cloud ec2`` reads; they land in ``ServeOptions.backend_options``."""

from __future__ import annotations

from dataclasses import dataclass

from plugins.backends.ec2.flags import Flags, flag
from plugins.backends.ec2.machine import GPU_INSTANCE_TYPES
from plugins.backends.ec2.userdata import default_install_spec


def _gpu_table() -> str:
    """``0: m5.large, 1: g5.xlarge, 2-4: g5.12xlarge, ...`` for --help."""
    rows, low = [], 0
    for count, name in GPU_INSTANCE_TYPES:
        rows.append(f"{low}: {name}" if low == count else f"{low}-{count}: {name}")
        low = count + 1
    return ", ".join(rows)


GPU_TABLE = _gpu_table()


@dataclass(frozen=True)
class Ec2Options(Flags):
    """The ``serve`` options only this backend reads (``ServeOptions.backend_options``)."""

    instance_type: str | None = flag(
        None, f"[ec2] Instance type; default by --gpus ({GPU_TABLE}; more: name a type).")
    region: str | None = flag(
        None, "[ec2] AWS region; default: AWS_DEFAULT_REGION / your AWS config.")
    ami: str | None = flag(
        None, "[ec2] Image to boot; default: the newest public AMI named like $STUDIO_EC2_AMI_NAME "
        "owned by $STUDIO_EC2_AMI_OWNER (AWS's Deep Learning Base GPU AMI, Ubuntu 24.04).")
    key_name: str | None = flag(None, "[ec2] EC2 key pair for SSH; also opens port 22 from --cidr.")
    cidr: str = flag("0.0.0.0/0", "[ec2] Who may connect to --port (and 22 with --key-name).")
    subnet_id: str | None = flag(
        None, "[ec2] Subnet to start in (it must assign public addresses); default: the default "
        "VPC.")
    iam_profile: str | None = flag(
        None, "[ec2] Instance profile that lets the instance read the s3:// store.")
    no_auth: bool = flag(
        False, "[ec2] Serve without a token (anyone who can reach the port may use it). Default: "
        "a token is generated and printed.")
    no_tls: bool = flag(
        False, "[ec2] Serve plain HTTP: the token and the data cross the network readable by "
        "anyone on the way. Default: HTTPS with a certificate from your own CA (see ls/README).")
    wait_ready: bool = flag(False, "[ec2] Also wait until the server answers /v2/health/ready.")
    launch_timeout: float = flag(
        900.0, "[ec2] Seconds to wait for the instance (and with --wait-ready, the server) before "
        "giving up and removing it.", click_type=lambda click: click.FloatRange(min=1))
    spot: bool = flag(
        False, "[ec2] Run on spot capacity (a fraction of the on-demand price; AWS may take it "
        "back with two minutes' notice, on which the server drains and exits). --cloud ec2spot "
        "is the same.")
    bid: float | None = flag(
        None, "[ec2] With --spot: the most to pay per instance-hour, in USD; default: the "
        "on-demand price.", click_type=lambda click: click.FloatRange(min=0.0001, max=10000))
    install: str | None = flag(
        None, "[ec2] What the instance pip-installs (e.g. "
        f"'{default_install_spec()}'); default: wheels of the studio-plugins and plugin "
        "distributions that run here, shipped through the store.",
        envvar="STUDIO_EC2_INSTALL")
