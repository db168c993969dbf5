#!/usr/bin/env bash
# Regenerates the committed Python code of the jinfer.v1 protocol:
#   serve/proto/jinfer/v1/jinfer_pb2.py, jinfer_pb2.pyi, jinfer_pb2_grpc.py
#
# Run from anywhere:  serve/proto/generate.sh
#
# grpcio-tools is pinned because the generated *_pb2_grpc.py refuses to import under a grpcio older than
# the grpcio-tools that wrote it, and the GPU machines run grpcio 1.84. The pinned tools are installed
# once into a cache directory, apart from the environment's own packages. serve/ installs as jinfer.serve,
# so protoc runs in a scratch include root where the .proto sits at jinfer/serve/proto/...: the generated
# imports then read `from jinfer.serve.proto.jinfer.v1 import jinfer_pb2`.
set -euo pipefail

TOOLS_VERSION=1.84.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/jinfer/grpcio-tools-$TOOLS_VERSION"
REL=jinfer/serve/proto/jinfer/v1

if ! PYTHONPATH="$TOOLS" "$PY" -c "import grpc_tools" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --target "$TOOLS" "grpcio-tools==$TOOLS_VERSION"
fi

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/$REL"
cp "$ROOT/serve/proto/jinfer/v1/jinfer.proto" "$SCRATCH/$REL/"
(cd "$SCRATCH" && PYTHONPATH="$TOOLS" "$PY" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. "$REL/jinfer.proto")
cp "$SCRATCH/$REL"/jinfer_pb2.py "$SCRATCH/$REL"/jinfer_pb2.pyi "$SCRATCH/$REL"/jinfer_pb2_grpc.py \
  "$ROOT/serve/proto/jinfer/v1/"
echo "generated serve/proto/jinfer/v1/jinfer_pb2{.py,.pyi,_grpc.py} with grpcio-tools $TOOLS_VERSION"
