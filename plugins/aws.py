"""boto3 clients and AWS errors as one clear line: shared by the S3 store and the EC2 backend.

Standard boto3 configuration applies (``AWS_PROFILE``, environment credentials, shared config,
instance roles, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``), so any
S3-compatible endpoint works. boto3 is imported here, lazily, never at plugin import time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from studio_plugins import MissingDependencyError, StudioError

CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run `aws configure`"
)
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "Forbidden", "403",
           "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthFailure", "InvalidClientTokenId",
           "ExpiredToken", "RequestExpired"}


def client(service: str, region: str | None = None) -> Any:
    """A boto3 client from a fresh session (thread-safe to create; retries in standard mode)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise MissingDependencyError("boto3", "aws") from None
    for name in ("botocore", "boto3"):  # they log every credential/endpoint lookup at INFO
        quiet = logging.getLogger(name)
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10,
                    read_timeout=60)
    return boto3.session.Session().client(service, region_name=region, config=config)


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def aws_errors(
    error: type[StudioError], what: str, *, missing: dict[str, tuple[str, str]] | None = None
) -> Iterator[None]:
    """Turn botocore exceptions raised inside into ``error`` with one line and a hint.

    ``what`` names the thing being worked on (``s3://bucket/prefix``); ``missing`` maps error
    codes that mean "it does not exist" to ``(message, hint)``.
    """
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
        )
    except ImportError:
        raise MissingDependencyError("boto3", "aws") from None
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise error(f"no AWS credentials found for {what}", hint=CREDENTIALS_HINT) from None
    except NoRegionError:
        raise error(
            f"no AWS region configured for {what}",
            hint="pass --region or set AWS_DEFAULT_REGION (or a region in ~/.aws/config)",
        ) from None
    except EndpointConnectionError as exc:
        raise error(
            f"cannot reach the AWS endpoint for {what}: {exc}",
            hint="check the network, the region and AWS_ENDPOINT_URL",
        ) from None
    except ClientError as exc:
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        operation = getattr(exc, "operation_name", "the request")
        if missing and code in missing:
            text, hint = missing[code]
            raise error(text, hint=hint) from None
        if code in _DENIED:
            raise error(
                f"access denied to {what} ({operation}: {code})",
                hint="check the credentials in use (`aws sts get-caller-identity`) and that "
                "their policy allows this action",
            ) from None
        raise error(f"AWS {operation} failed for {what}: {code}: {message}") from None
    except BotoCoreError as exc:
        raise error(f"AWS request failed for {what}: {exc}") from None
