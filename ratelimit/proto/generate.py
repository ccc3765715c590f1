"""Regenerate the Python modules of kuadrantrls.proto (committed next to it):

    python -m ratelimit.proto.generate          (or: make -C ratelimit/proto)

Needs grpcio-tools (a development tool only: the service imports the generated modules).

The .proto imports Envoy's rls.proto, but the `xds-protos` package ships only generated Python
modules, not .proto sources. Their descriptors are enough: they are written to a FileDescriptorSet
that protoc reads with `--descriptor_set_in`, so the generated code is built against exactly the
Envoy messages the service runs with, and nothing is downloaded.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

PROTO = "ratelimit/proto/kuadrantrls.proto"
ROOT = Path(__file__).resolve().parents[2]
"""The import root: the generated modules then import each other as `ratelimit.proto.*`."""


def _with_dependencies(files: Sequence[FileDescriptor]) -> Iterator[FileDescriptor]:
    """Each file once, dependencies first (the order protoc needs to link them)."""
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> Iterator[FileDescriptor]:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            yield from visit(dependency)
        yield file

    for file in files:
        yield from visit(file)


def envoy_descriptor_set() -> bytes:
    """A serialized FileDescriptorSet of the Envoy protos kuadrantrls.proto imports."""
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    for file in _with_dependencies([rls_pb2.DESCRIPTOR, ratelimit_pb2.DESCRIPTOR]):
        file.CopyToProto(descriptor_set.file.add())
    return descriptor_set.SerializeToString()


def generate(out_dir: Path = ROOT) -> None:
    """Write kuadrantrls_pb2.py, .pyi and _pb2_grpc.py under `out_dir`/ratelimit/proto/."""
    from grpc_tools import protoc  # only here: grpcio-tools is not a runtime dependency

    with tempfile.NamedTemporaryFile(suffix=".pb") as descriptors:
        descriptors.write(envoy_descriptor_set())
        descriptors.flush()
        out = str(out_dir)
        status = protoc.main([
            "protoc", f"--descriptor_set_in={descriptors.name}", f"--proto_path={ROOT}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO,
        ])
    if status != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {status})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
