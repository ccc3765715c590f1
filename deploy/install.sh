#!/bin/sh
# The Dockerfile's install steps, kept in one script so tests/test_deploy.py can run exactly them in
# a fresh virtual environment: build the project's wheel, install it (dependencies from PyPI) into
# a new venv, and drop the wheel.
#   deploy/install.sh SOURCE_DIR VENV_DIR
set -eu
source_dir=$1
venv=$2
python3 -m venv "$venv"
"$venv/bin/pip" wheel --no-deps --wheel-dir "$venv/wheels" "$source_dir"
"$venv/bin/pip" install "$venv"/wheels/*.whl
rm -rf "$venv/wheels"
# xds-protos ships an old copy of opentelemetry/proto/*_pb2.py; opentelemetry-proto's own files must win
# (see restore_opentelemetry_protos in scripts/lib.sh).
otel_proto=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
"$venv/bin/pip" install --quiet --no-deps --force-reinstall "opentelemetry-proto==$otel_proto"
"$venv/bin/python" -c 'from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter'
"$venv/bin/ratelimit" validate >/dev/null   # the embedded example limits load: the install works
