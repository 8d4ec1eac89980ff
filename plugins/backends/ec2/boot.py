"""What the instance's boot script runs to fetch its secrets from Parameter Store
(``parameters.py``), with its instance profile, after this package is installed:

    STUDIO_TOKEN="$(python -m plugins.backends.ec2.boot token NAME)"   # into the environment
    python -m plugins.backends.ec2.boot tls NAME DIR --wait SECONDS    # files, mode 0600

The token goes to stdout only, captured by the shell into ``serve``'s environment: never a
command line (process listings) nor a file. The TLS parameter is created by the CLI once the
instance's address is known, so it may not exist yet at boot: ``tls`` waits for it (bounded).
Nothing secret is ever printed to the log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from plugins.aws import client, error_code
from plugins.backends.ec2.parameters import TLS_FILES


def fetch(ssm: Any, name: str, wait: float, sleep: float = 5.0) -> str:
    """The parameter's decrypted value, waiting up to ``wait`` s for it to exist."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return str(ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"])
        except Exception as exc:
            if error_code(exc) != "ParameterNotFound" or time.monotonic() >= deadline:
                reason = error_code(exc) or exc
                raise SystemExit(f"studio-plug: cannot read parameter {name}: {reason}") from None
        time.sleep(sleep)


def write_tls(value: str, directory: Path) -> None:
    """Write the ``tls`` parameter's files (``TLS_FILES`` only), each mode 0600 from its creation,
    into ``directory`` (mode 0700)."""
    files = json.loads(value)
    if not isinstance(files, dict) or not set(files) <= set(TLS_FILES):
        raise SystemExit("studio-plug: the tls parameter is not what the CLI writes")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, pem in files.items():
        path = directory / name
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(pem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.backends.ec2.boot")
    parser.add_argument("what", choices=("token", "tls"))
    parser.add_argument("name")
    parser.add_argument("directory", nargs="?", type=Path)
    parser.add_argument("--wait", type=float, default=0.0)
    args = parser.parse_args(argv)
    value = fetch(client("ssm"), args.name, args.wait)
    if args.what == "token":
        sys.stdout.write(value)
    elif args.directory is None:
        parser.error("tls needs the directory to write to")
    else:
        write_tls(value, args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
