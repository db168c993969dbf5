"""`jinfer client "PROMPT"`: stream a generation from a jinfer server to the terminal.

The text goes to stdout as it arrives; the finish reason, usage and time to first token go to stderr at
the end. A gRPC error prints its status code and message and exits 1 (2 for INVALID_ARGUMENT).
"""

from __future__ import annotations

import argparse
import os
import sys

from jinfer.serve.sampling_flags import add_sampling_arguments, sampling_fields


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--target", default="localhost:50051", help="host:port of the server")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    add_sampling_arguments(p)
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    p.add_argument("--token-file", help="file holding the bearer token (or set JINFER_AUTH_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", help="PEM file of the certificate(s) to trust (implies --tls)")
    p.add_argument("--server-name", help="the name the server's certificate is checked against")


def _token(args) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip() or None
    return os.environ.get("JINFER_AUTH_TOKEN", "").strip() or None


def run(args) -> int:
    import grpc

    from jinfer.serve.client import JinferClient

    roots = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            roots = f.read()
    sampling = sampling_fields(args)
    prompt = dict(messages=[{"role": "user", "content": args.prompt}]) if args.chat else dict(prompt=args.prompt)
    with JinferClient(args.target, token=_token(args), root_certificates=roots, tls=args.tls,
                      timeout=args.timeout, server_name=args.server_name) as client:
        call = client.stream(**prompt, **sampling)
        last = None
        try:
            for msg in call:
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
        except grpc.RpcError as e:
            if last is not None:
                sys.stdout.write("\n")
            if e.code() == grpc.StatusCode.UNAVAILABLE and last is None:
                print(f"jinfer client: no jinfer server answers at {args.target}", file=sys.stderr)
                return 1
            print(f"jinfer client: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        except KeyboardInterrupt:
            call.cancel()
            return 130
    sys.stdout.write("\n")
    if last is not None:
        from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb

        u = last.usage
        print(f"[{pb.FinishReason.Name(last.finish_reason).removeprefix('FINISH_REASON_').lower()}: "
              f"{u.prompt_tokens} prompt tokens ({u.cached_prompt_tokens} cached), {u.completion_tokens} generated, "
              f"first token after {last.time_to_first_token_s * 1000:.0f} ms]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.client_cli", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
