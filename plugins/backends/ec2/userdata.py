"""The instance's user data: install this package, fetch the wrapper, serve, then power off.

The script is plain bash run once by cloud-init as root. Whatever way it ends — ``serve`` exits
after ``--killafter`` idle seconds, is stopped, or a step fails — the ``EXIT`` trap shuts the
machine down, and the instance was launched with ``InstanceInitiatedShutdownBehavior=terminate``,
so it is terminated: nothing is left billing. The script holds no secret: the token and the TLS
key are read from Parameter Store at boot (``boot.py``), the token into ``STUDIO_TOKEN`` in the
environment, never on the command line (process listings).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from studio_plugins import __version__

VENV = "/opt/studio-plug"
LOG = "/var/log/studio-plug.log"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TLS_DIR = f"{VENV}/tls"
"""Where the instance writes its key and certificate (mode 0600) from the ``tls`` parameter."""
TLS_WAIT = 900
"""Seconds the instance waits for its ``tls`` parameter (the CLI writes it once the address is known)."""
BOOT = "python -m plugins.backends.ec2.boot"
WHEEL_EXTRAS = "all"
"""The extras of the shipped ``studio-plugins`` wheel the instance installs from the index:
every framework, as the model's loader is found on the instance from its checkpoint."""


def default_install_spec() -> str:
    return f"studio-plugins[all]=={__version__}"


@dataclass(frozen=True)
class WrapperFetch:
    """Copy ``s3://bucket/key`` to ``path`` on the instance before serving."""

    bucket: str
    key: str
    path: str


@dataclass(frozen=True)
class UserData:
    serve_argv: list[str]
    """``studio-plug serve ...`` exactly as the instance runs it."""
    environment: Mapping[str, str] = field(default_factory=dict)
    install: str = field(default_factory=default_install_spec)
    cpu_only: bool = False
    """Install the CPU build of torch first (no GB of CUDA wheels on a CPU instance)."""
    wrappers: tuple[WrapperFetch, ...] = ()
    """The wrapper files ``serve_argv`` names, each copied from the store before serving."""
    token_parameter: str | None = None
    """The Parameter Store name of the token, read into ``STUDIO_TOKEN`` before serving."""
    tls_parameter: str | None = None
    """The Parameter Store name of the key and certificate, written to ``TLS_DIR``."""
    wheels: tuple[WrapperFetch, ...] = ()
    """Wheels shipped from the launching machine (``wheels.py``): fetched from the store (with
    boto3, installed first for that) and installed instead of ``install``; the first is
    ``studio-plugins``, installed with its extras."""
    requirements: tuple[str, ...] = ()
    """Beside ``wheels``: plugin distributions the index has (``name==version``)."""

    def serve_line(self) -> str:
        return shlex.join(self.serve_argv)

    def render(self) -> str:
        q = shlex.quote
        lines = [
            "#!/bin/bash",
            f"# studio-plug {__version__}: serve, then shut down (and so terminate) when serve exits.",
            f"exec >>{LOG} 2>&1",
            "trap 'echo \"studio-plug: exiting, shutting the instance down\"; shutdown -h now' EXIT",
            "set -euo pipefail",
            "export HOME=/root PYTHONUNBUFFERED=1 KERAS_BACKEND=torch",
        ]
        lines += [f"export {name}={q(value)}" for name, value in sorted(self.environment.items())]
        lines += [
            f"if ! python3 -m venv {VENV}; then",
            "  apt-get update -q && apt-get install -y -q python3-venv",
            f"  python3 -m venv {VENV}",
            "fi",
            f"export PATH={VENV}/bin:$PATH",
            "pip install -q --upgrade pip",
        ]
        if self.cpu_only:
            lines.append(f"pip install -q torch --index-url {CPU_TORCH_INDEX}")
        fetch = ('import sys, boto3; '
                 'boto3.client("s3").download_file(sys.argv[1], sys.argv[2], sys.argv[3])')
        if self.wheels:
            lines += ["pip install -q boto3", f"mkdir -p {VENV}/wheels"]
            lines += [shlex.join(["python", "-c", fetch, w.bucket, w.key, w.path]) for w in self.wheels]
            ours, *plugins = (w.path for w in self.wheels)
            lines.append(shlex.join(["pip", "install", "-q", f"{ours}[{WHEEL_EXTRAS}]", *plugins,
                                     *self.requirements]))
        else:
            lines.append(f"pip install -q {q(self.install)}")
        for wrapper in self.wrappers:
            directory = wrapper.path.rsplit("/", 1)[0]
            lines.append(f"mkdir -p {q(directory)}")
            lines.append(shlex.join(["python", "-c", fetch, wrapper.bucket, wrapper.key, wrapper.path]))
        if self.token_parameter:  # assigned, then exported: `export X="$(...)"` hides a failure
            lines.append(f'STUDIO_TOKEN="$({BOOT} token {q(self.token_parameter)})"')
            lines.append("export STUDIO_TOKEN")
        if self.tls_parameter:
            lines.append(f"{BOOT} tls {q(self.tls_parameter)} {TLS_DIR} --wait {TLS_WAIT}")
        lines.append(f"cd {VENV}")
        lines.append(self.serve_line())
        return "\n".join(lines) + "\n"


def serve_lines(script: str) -> list[str]:
    """The ``studio-plug serve`` command lines of a rendered script."""
    return [line for line in script.splitlines() if line.startswith("studio-plug serve ")]
