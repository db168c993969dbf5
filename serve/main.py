"""`jinfer serve` (also `python -m jinfer.serve.main`): load a model, warm up, serve gRPC, drain on SIGTERM.

The port is bound first, before the model loads, so a port in use (by another server or any program: port
reuse is off) ends the start at once with one error line and exit code 2. The health service answers once
the model is loaded, NOT_SERVING until the warm-up ends. SIGTERM (or SIGINT) starts the drain:
NOT_SERVING again, new calls refused, calls in flight given `--drain-grace` seconds to finish; then the
process exits 0.

Logs are JSON lines on stderr, each starting with "ts", the record's time in ISO 8601 UTC with
milliseconds ("2026-12-01T09:30:00.123Z"), and "level": one when the port is bound (`listening`, with
the port, so `--port 0` is usable), one when serving starts, one per finished request, and the drain's.
`--log-level` filters jinfer's own lines; other libraries log their warnings and errors only (orbax's and
absl's INFO lines are dropped), as JSON lines too, with "logger" and "message".

`--model tiny-random` serves the tiny random-weight model of `jinfer.testing.tiny` (part of the installed
package), for tests and benchmarks of the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import sys

log = logging.getLogger("jinfer.serve")

TINY_RANDOM = "tiny-random"


def add_quantization_arguments(p) -> None:
    """--quantization and its group size (also on `jinfer generate` and `jinfer batch`)."""
    from jinfer.quant.formats import METHODS

    p.add_argument("--quantization", default=None, choices=METHODS,
                   help="quantize the layers' matmul weights at load, by round to nearest; gguf: keep a GGUF "
                        "file's Q8_0 / Q4_0 / Q4_1 blocks")
    p.add_argument("--quantization-group-size", type=int, default=None,
                   help="inputs per quantization scale (0: one per output channel; default: the format's)")


def add_kv_cache_arguments(p) -> None:
    """--kv-cache-dtype (also on `jinfer generate` and `jinfer batch`)."""
    from jinfer.quant.formats import KV_CACHE_ALIASES, KV_CACHE_DTYPES

    p.add_argument("--kv-cache-dtype", default=None, choices=[*KV_CACHE_ALIASES, *KV_CACHE_DTYPES],
                   help="store the KV cache in 8 bits with a scale per token and head (fp8 = fp8_e4m3: "
                        "float8_e4m3fn), ~2x the tokens of bfloat16 in the same memory; auto: the model's dtype")


def add_speculative_arguments(p) -> None:
    """--speculative-config (also on `jinfer generate` and `jinfer batch`)."""
    p.add_argument("--speculative-config", default=None, type=_speculative_json, metavar="JSON",
                   help='speculative decoding, vLLM\'s dict as JSON: {"method": "ngram" | "draft" | "early_exit", '
                        '"num_speculative_tokens": k, ...} (draft: "model": the draft checkpoint)')


def _speculative_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object such as {\"method\": \"ngram\"}")
    return value


def load_draft(config) -> tuple | None:
    """(config, params) of a speculative config's draft model (method "draft"), loaded as the target is."""
    spec = config.speculative
    if spec is None or spec.method != "draft":
        return None
    from jinfer.checkpoints.load import load

    d = load(spec.model)
    return d.config, d.params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="registered name (pulled on first use), GGUF file, HF directory or orbax checkpoint; "
                        f"'{TINY_RANDOM}' for the tiny test model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 or :: for every interface)")
    p.add_argument("--port", type=int, default=50051, help="0: let the OS pick (the 'listening' log line has it)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) on "
                        "this port of --host; 0: let the OS pick")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) in place of the model's own")
    add_quantization_arguments(p)
    add_kv_cache_arguments(p)
    add_speculative_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="seed of requests that set none")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", help="PEM certificate chain file; with --tls-key the server speaks TLS only")
    s.add_argument("--tls-key", help="PEM private key file")
    s.add_argument("--auth-token-file",
                   help="file of bearer tokens, one per line (or set JINFER_AUTH_TOKEN); calls without one get "
                        "UNAUTHENTICATED")
    s.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    o = p.add_argument_group("operations")
    o.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    o.add_argument("--metrics-host", default="127.0.0.1")
    o.add_argument("--drain-grace", type=float, default=30.0, help="seconds in-flight calls get after SIGTERM")
    o.add_argument("--no-compile-cache", action="store_true", help="do not use XLA's persistent compile cache")
    o.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), help="of jinfer's own log lines")


def add_engine_arguments(p, parallel: bool = True) -> None:
    """The engine's shape flags (`engine_config` reads them); `parallel`: also --tensor-parallel / --data-parallel
    (`jinfer batch` has its own)."""
    e = p.add_argument_group("engine")
    e.add_argument("--max-slots", type=int, default=None, help="requests decoding at once")
    e.add_argument("--num-pages", type=int, default=None, help="KV pages (default: from free device memory)")
    e.add_argument("--page-size", type=int, default=None)
    e.add_argument("--max-waiting", type=int, default=None, help="queued requests before RESOURCE_EXHAUSTED")
    e.add_argument("--max-model-len", type=int, default=None, help="context per request (default: the model's)")
    e.add_argument("--token-buckets", default=None,
                   help="comma-separated tokens-per-prefill-step buckets, e.g. 16,64,256 (default: the platform's)")
    e.add_argument("--decode-buckets", default=None,
                   help="comma-separated requests-per-decode-block buckets, e.g. 1,4,16 (default: the platform's)")
    e.add_argument("--decode-steps", type=int, default=None,
                   help="most tokens a request decodes per engine step, streamed together (default: the platform's)")
    e.add_argument("--max-prefill-chunk", type=int, default=None)
    e.add_argument("--no-prefix-caching", action="store_true")
    if parallel:
        e.add_argument("--tensor-parallel", type=int, default=1, help="devices each model replica is split over")
        e.add_argument("--data-parallel", type=int, default=1,
                       help="engine replicas, each with its own slots and pages; a request stays on one")


def engine_config(args, dtype: str, **defaults):
    """EngineConfig from the flags; `defaults`: a command's own values for flags left unset."""
    from jinfer.engine.config import EngineConfig

    kw = dict(max_slots=args.max_slots, num_pages=args.num_pages, page_size=args.page_size,
              max_waiting=args.max_waiting, max_model_len=args.max_model_len,
              max_prefill_chunk=args.max_prefill_chunk, decode_steps=args.decode_steps,
              quantization=args.quantization, quantization_group_size=args.quantization_group_size,
              kv_cache_dtype=args.kv_cache_dtype, speculative=args.speculative_config)
    kw = {k: v for k, v in kw.items() if v is not None}
    kw = {**defaults, **kw}
    for flag in ("token_buckets", "decode_buckets"):
        value = getattr(args, flag)
        if value:
            try:
                kw[flag] = tuple(int(x) for x in value.split(","))
            except ValueError:
                raise ValueError(f"--{flag.replace('_', '-')}={value!r} must be comma-separated integers") from None
    if args.no_prefix_caching:
        kw["enable_prefix_caching"] = False
    return EngineConfig(dtype=dtype, tensor_parallel=getattr(args, "tensor_parallel", 1),
                        data_parallel=getattr(args, "data_parallel", 1), **kw)


def chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the value itself when it names no file."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def build_engine(args):
    """An Engine, or a DataParallelEngine with --data-parallel > 1 (the server needs only their common API)."""
    from jinfer.runtime.build import make_engine

    cfg = engine_config(args, args.dtype)
    template = chat_template(args.chat_template)
    if args.model == TINY_RANDOM:
        from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer

        config, params, tokenizer = TINY, tiny_params(), tiny_tokenizer()
    else:
        from jinfer.checkpoints.load import load

        loaded = load(args.model, quantization=args.quantization)  # as LLM loads it; serving sits below the entry points, so not through LLM
        config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    if template is not None:
        if tokenizer is None:
            raise ValueError("--chat-template: this model has no tokenizer")
        tokenizer = tokenizer.with_chat_template(template)
    return make_engine(config, params, tokenizer, cfg, seed=args.seed, draft_model=load_draft(cfg))


def read_tokens(path: str | None) -> tuple[str, ...]:
    tokens = []
    if path:
        with open(path) as f:
            tokens = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not tokens:
            raise ValueError(f"--auth-token-file {path!r} holds no token")
    env = os.environ.get("JINFER_AUTH_TOKEN")
    if env is not None:
        if not env.strip():  # e.g. JINFER_AUTH_TOKEN=$UNSET: serving without authentication was not meant
            raise ValueError("JINFER_AUTH_TOKEN is set but blank: set it to a token, or unset it to serve "
                             "without authentication")
        tokens.append(env.strip())
    return tuple(tokens)


def options(args):
    from jinfer.serve.app import ServeOptions

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    cert = key = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as f:
            cert = f.read()
        with open(args.tls_key, "rb") as f:
            key = f.read()
    return ServeOptions(host=args.host, port=args.port, model_name=args.model, tls_cert_chain=cert,
                        tls_private_key=key, auth_tokens=read_tokens(args.auth_token_file),
                        max_message_bytes=args.max_message_bytes, metrics_host=args.metrics_host,
                        metrics_port=args.metrics_port, drain_grace_s=args.drain_grace, http_port=args.http_port)


async def serve(args, opts) -> int:
    from jinfer.serve.app import ServeApp

    app = ServeApp(opts)
    port = await app.bind()  # before the model loads: a port in use fails in a second, not after the load
    log.info(json.dumps({"event": "listening", "host": opts.host, "port": port, "http_port": app.http_port,
                         "tls": opts.tls_cert_chain is not None,
                         "auth": bool(opts.auth_tokens), "metrics_port": app.metrics_port, "model": opts.model_name}))
    engine = build_engine(args)  # blocking the loop: nothing is served until start()
    await app.start(engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.ensure_future(app.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.result():
        log.info(json.dumps({"event": "serving", "port": port}))
        failed = asyncio.ensure_future(app.failed.wait())
        await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
    ready.cancel()
    stopping.cancel()
    await app.drain()
    return 1 if app.failed.is_set() else 0


class JsonLines(logging.Formatter):
    """Every record as one JSON object: "ts" and "level", then the fields of a message that is a JSON object
    itself (jinfer's lines), else "logger" and "message"; a traceback goes in "exception"."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname}
        message = record.getMessage()
        fields = None
        if message.startswith("{"):
            try:
                fields = json.loads(message)
            except ValueError:
                pass
        line.update(fields if isinstance(fields, dict) else {"logger": record.name, "message": message})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str) -> None:
    """JSON lines on stderr; `level` filters the `jinfer.*` loggers, every other library's warnings and
    errors pass (their INFO lines, orbax's and absl's above all, were half of a start's output)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("jinfer").setLevel(level)
    # Records of a logger with a level of its own reach the root's handler whatever the root's level.
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)


def run(args) -> int:
    configure_logging(args.log_level)
    opts = options(args)  # before anything slow, so a bad flag fails fast
    if not args.no_compile_cache:
        from jinfer.runtime.compile_cache import enable_compile_cache

        enable_compile_cache()
    try:
        return asyncio.run(serve(args, opts))
    except OSError as e:  # a port that cannot be bound; `jinfer serve` (the CLI) reports only ValueErrors itself
        print(f"jinfer serve: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jinfer.serve.main", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"jinfer serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
