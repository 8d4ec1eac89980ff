"""Regenerate the checked-in ``*_pb2.py`` / ``*_pb2_grpc.py`` from the ``.proto`` files here.

    python -m plugins.protocols.grpc.generate      (needs grpcio-tools; not needed to serve)

The protos are Triton's (github.com/triton-inference-server/common, ``protobuf/``, commit
``SOURCE_COMMIT``), unchanged: service ``inference.GRPCInferenceService`` is what
``tritonclient.grpc``, ``perf_analyzer`` and KServe clients speak. protoc's Python output is
patched twice so it can live in this package beside a client's own copy of the same protos:

- its ``import model_config_pb2`` becomes a relative import (protoc only writes top-level ones);
- its descriptors go to a pool of this package's own (``descriptor_pool.DescriptorPool()``), not
  protobuf's default one: ``tritonclient.grpc`` registers the same file names and message names
  there, with other contents, and a second registration is an error on import. The wire format
  (package ``inference``, field numbers, method paths) does not depend on the pool.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE_COMMIT = "83adf7cf88a2f343005974dff3728be746de2d66"
PROTOS = ("model_config.proto", "grpc_service.proto")
POOL_MODULE = "_pool"


def main() -> int:
    import google.protobuf
    import grpc_tools
    from grpc_tools import protoc

    tools_version = _distribution_version("grpcio-tools")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={HERE}", f"--grpc_python_out={HERE}"]
    if protoc.main([*args, *(str(HERE / proto) for proto in PROTOS)]) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    header = (f"# Generated from Triton's {{proto}} (triton-inference-server/common {SOURCE_COMMIT[:12]})\n"
              f"# by grpcio-tools {tools_version} (its protoc writes protobuf {{gencode}} code; generated\n"
              f"# with protobuf {google.protobuf.__version__} installed), then patched by generate.py\n"
              "# (relative imports, this package's own descriptor pool). Do not edit.\n")
    gencode = "?"
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        for path in (HERE / f"{stem}_pb2.py", HERE / f"{stem}_pb2_grpc.py"):
            if not path.exists():  # model_config has no service: its _pb2_grpc is empty
                continue
            text = path.read_text()
            if path.name.endswith("_pb2_grpc.py") and "class " not in text:
                path.unlink()
                continue
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
            text = text.replace("_descriptor_pool.Default()", f"{POOL_MODULE}.POOL")
            if f"{POOL_MODULE}.POOL" in text:
                text = text.replace("from google.protobuf import descriptor_pool as _descriptor_pool\n",
                                    f"from . import {POOL_MODULE}\n")
            found = re.search(r"Protobuf Python Version: (\S+)", text)
            gencode = found[1] if found else gencode  # the _pb2_grpc (after its _pb2) says none
            path.write_text(header.format(proto=proto, gencode=gencode) + text)
    return 0


def _distribution_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
