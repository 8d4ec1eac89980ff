"""The ``serve`` options only ``--cloud ec2`` reads; they land in ``ServeOptions.backend_options``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from plugins.backends.ec2.machine import GPU_INSTANCE_TYPES
from plugins.backends.ec2.userdata import default_install_spec
from studio_plugins import ServeOptions

if TYPE_CHECKING:
    import click


def _gpu_table() -> str:
    """``0: m5.large, 1: g5.xlarge, 2-4: g5.12xlarge, ...`` for --help."""
    rows, low = [], 0
    for count, name in GPU_INSTANCE_TYPES:
        rows.append(f"{low}: {name}" if low == count else f"{low}-{count}: {name}")
        low = count + 1
    return ", ".join(rows)


GPU_TABLE = _gpu_table()


@dataclass(frozen=True)
class Ec2Options:
    """The ``serve`` options only this backend reads (``ServeOptions.backend_options``)."""

    instance_type: str | None = None
    region: str | None = None
    ami: str | None = None
    key_name: str | None = None
    cidr: str = "0.0.0.0/0"
    subnet_id: str | None = None
    iam_profile: str | None = None
    no_auth: bool = False
    wait_ready: bool = False
    launch_timeout: float = 900.0
    install: str | None = None

    @classmethod
    def from_options(cls, options: ServeOptions) -> Ec2Options:
        known = cls.__dataclass_fields__
        values = {k: v for k, v in options.backend_options.items() if k in known and v is not None}
        return cls(**values)


def cli_options() -> list[click.Option]:
    import click

    return [
        click.Option(["--instance-type"], default=None,
                     help=f"[ec2] Instance type; default by --gpus ({GPU_TABLE}; more: name "
                     "a type)."),
        click.Option(["--region"], default=None,
                     help="[ec2] AWS region; default: AWS_DEFAULT_REGION / your AWS config."),
        click.Option(["--ami"], default=None,
                     help="[ec2] Image to boot; default: the newest public AMI named like "
                     "$STUDIO_EC2_AMI_NAME owned by $STUDIO_EC2_AMI_OWNER (AWS's Deep Learning "
                     "Base GPU AMI, Ubuntu 24.04)."),
        click.Option(["--key-name"], default=None,
                     help="[ec2] EC2 key pair for SSH; also opens port 22 from --cidr."),
        click.Option(["--cidr"], default="0.0.0.0/0",
                     help="[ec2] Who may connect to --port (and 22 with --key-name)."),
        click.Option(["--subnet-id"], default=None,
                     help="[ec2] Subnet to start in (it must assign public addresses); default: "
                     "the default VPC."),
        click.Option(["--iam-profile"], default=None,
                     help="[ec2] Instance profile that lets the instance read the s3:// store."),
        click.Option(["--no-auth"], is_flag=True, default=False,
                     help="[ec2] Serve without a token (anyone who can reach the port may use "
                     "it). Default: a token is generated and printed."),
        click.Option(["--wait-ready"], is_flag=True, default=False,
                     help="[ec2] Also wait until the server answers /v2/health/ready."),
        click.Option(["--launch-timeout"], type=click.FloatRange(min=1), default=900.0,
                     help="[ec2] Seconds to wait for the instance (and with --wait-ready, the "
                     "server) before giving up and removing it."),
        click.Option(["--install"], envvar="STUDIO_EC2_INSTALL", default=None,
                     help="[ec2] What the instance pip-installs; default: "
                     f"{default_install_spec()}."),
    ]
