"""Which machine to start: the instance type for ``--gpus`` and the AMI to boot.

Instance types by ``--gpus`` (the smallest row with at least that many GPUs; ``--instance-type``
overrides):

====  ===============  ================================
GPUs  instance type    what it is
====  ===============  ================================
0     ``m5.large``     2 vCPU, 8 GiB, no GPU
1     ``g5.xlarge``    1 NVIDIA A10G (24 GB), 4 vCPU
2-4   ``g5.12xlarge``  4 NVIDIA A10G, 48 vCPU
5-8   ``g5.48xlarge``  8 NVIDIA A10G, 192 vCPU
====  ===============  ================================

The AMI (``--ami`` overrides) is the newest public image whose name matches
``STUDIO_EC2_AMI_NAME`` (default: AWS's *Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu
24.04)*: NVIDIA drivers and CUDA, Python 3.12; it boots on CPU types too) owned by
``STUDIO_EC2_AMI_OWNER`` (default ``amazon``), for the instance type's architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from plugins.aws import aws_errors
from studio_plugins import BackendError, ConfigurationError

GPU_INSTANCE_TYPES: tuple[tuple[int, str], ...] = (
    (0, "m5.large"),
    (1, "g5.xlarge"),
    (4, "g5.12xlarge"),
    (8, "g5.48xlarge"),
)
SAME_SIZE: dict[str, tuple[str, ...]] = {
    "m5.large": ("m5.large", "m5a.large", "m6i.large", "m6a.large"),
    "g5.xlarge": ("g5.xlarge", "g6.xlarge"),
    "g5.12xlarge": ("g5.12xlarge", "g6.12xlarge"),
    "g5.48xlarge": ("g5.48xlarge", "g6.48xlarge"),
}
"""Per row of the table, the types of the same size (vCPUs, memory, GPU count and GPU memory:
A10G and L4 both have 24 GB) that a spot fleet may also run on (``spot.py``)."""
AMI_NAME_ENV = "STUDIO_EC2_AMI_NAME"
AMI_OWNER_ENV = "STUDIO_EC2_AMI_OWNER"
DEFAULT_AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"
DEFAULT_AMI_OWNER = "amazon"


def instance_type_for(gpus: int) -> str:
    for count, instance_type in GPU_INSTANCE_TYPES:
        if gpus <= count:
            return instance_type
    most = GPU_INSTANCE_TYPES[-1][0]
    raise ConfigurationError(
        f"no instance type in the table has {gpus} GPUs (at most {most})",
        hint="name one with --instance-type (e.g. p4d.24xlarge)",
    )


def same_size_types(instance_type: str) -> tuple[str, ...]:
    """``instance_type`` and the types of its size (itself alone when it is not in the table)."""
    return SAME_SIZE.get(instance_type, (instance_type,))


def describe_type(ec2: Any, instance_type: str, region: str) -> tuple[str, int]:
    """The type's architecture (``x86_64``/``arm64``) and GPU count; an unknown type is an error."""
    with aws_errors(BackendError, f"instance type {instance_type}", missing={
        "InvalidInstanceType": (f"EC2 has no instance type {instance_type!r} in {region}",
                                "see `aws ec2 describe-instance-types` or leave --instance-type "
                                "out to pick one by --gpus"),
    }):
        found = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    if not found:
        raise BackendError(f"EC2 has no instance type {instance_type!r} in {region}")
    architectures = found[0].get("ProcessorInfo", {}).get("SupportedArchitectures") or ["x86_64"]
    gpus = sum(int(g.get("Count", 0)) for g in found[0].get("GpuInfo", {}).get("Gpus", []))
    return ("arm64" if "arm64" in architectures else architectures[0]), gpus


@dataclass(frozen=True)
class Image:
    image_id: str
    name: str


def find_ami(
    ec2: Any, architecture: str, name: str | None = None, owner: str | None = None
) -> Image:
    """The newest available public image matching the name pattern and owner."""
    name = name or os.environ.get(AMI_NAME_ENV) or DEFAULT_AMI_NAME
    owner = owner or os.environ.get(AMI_OWNER_ENV) or DEFAULT_AMI_OWNER
    with aws_errors(BackendError, "the AMI lookup"):
        images = ec2.describe_images(
            Owners=[owner],
            Filters=[
                {"Name": "name", "Values": [name]},
                {"Name": "architecture", "Values": [architecture]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
    if not images:
        raise BackendError(
            f"no {architecture} AMI named {name!r} owned by {owner}",
            hint=f"pass --ami ID, or set {AMI_NAME_ENV} / {AMI_OWNER_ENV} to an image name "
            "pattern and owner that exist in this region",
        )
    newest = max(images, key=lambda image: image.get("CreationDate", ""))
    return Image(newest["ImageId"], newest.get("Name", ""))


def check_ami(ec2: Any, image_id: str) -> Image:
    missing = (f"AMI {image_id} does not exist (or is not visible to you) in this region",
               "AMI ids differ between regions; check --ami and --region")
    with aws_errors(BackendError, f"AMI {image_id}", missing={
        "InvalidAMIID.NotFound": missing, "InvalidAMIID.Malformed": missing,
    }):
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    if not images:
        raise BackendError(missing[0], hint=missing[1])
    return Image(image_id, images[0].get("Name", ""))
