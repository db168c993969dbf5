"""Generated code of the jinfer gRPC protocol (see serve/proto/generate.sh)."""
