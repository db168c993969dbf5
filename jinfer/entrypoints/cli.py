"""The `jinfer` command line: `generate`, `chat`, `batch`, `perplexity`, `quantize`, `convert`, `pull`,
`models`, `serve`, `client`."""

from __future__ import annotations

import argparse
import os
import sys


def _enable_compile_cache() -> None:
    from jinfer.runtime.compile_cache import enable_compile_cache

    enable_compile_cache()


def cmd_generate(args) -> int:
    from jinfer.inputs import SamplingParams
    from jinfer.serve.sampling_flags import sampling_fields

    _enable_compile_cache()
    params = SamplingParams(**sampling_fields(args))
    llm = _llm(args)
    if args.chat:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    if not args.chat:
        sys.stdout.write(args.prompt)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _llm(args):
    """The model for one request at a time (generate, chat): one slot and one decode shape to compile, unless the
    engine flags say otherwise."""
    from jinfer.entrypoints.llm import LLM
    from jinfer.serve.main import engine_config

    one = dict(max_slots=1, decode_buckets=(1,)) if args.max_slots is None and not args.decode_buckets else {}
    return LLM(args.model, dtype=args.dtype, engine_config=engine_config(args, args.dtype, **one))


def cmd_chat(args) -> int:
    from jinfer.entrypoints.chat_repl import chat_repl
    from jinfer.inputs import SamplingParams
    from jinfer.serve.sampling_flags import sampling_fields

    _enable_compile_cache()
    sampling = sampling_fields(args)
    SamplingParams(**{**sampling, "max_tokens": sampling["max_tokens"] or 1})  # bad flags fail before the load
    return chat_repl(_llm(args), sampling, sys.stdin, sys.stdout, sys.stderr, system=args.system)


def cmd_models(args) -> int:
    from jinfer.checkpoints.registry import MODELS, cache_dir, model_dir

    root = cache_dir() / "models"
    print(f"registered models (cache: {root}):")
    for name, spec in sorted(MODELS.items()):
        d = model_dir(name)
        state = ("converted" if (d / "orbax" / "config.json").is_file()
                 else "downloaded" if (d / "source.gguf").is_file() else "not cached")
        print(f"  {name:<12} {spec.package}=={spec.version}  {state}")
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in MODELS) if root.is_dir() else []
    if others:
        print("other cached models:")
        for name in others:
            print(f"  {name:<12} {root / name}")
    return 0


def cmd_batch(args) -> int:
    import jax

    from jinfer.entrypoints.batch import merge_host_outputs, run_batch
    from jinfer.entrypoints.llm import LLM
    from jinfer.runtime import distributed
    from jinfer.serve.main import engine_config

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    _enable_compile_cache()
    # Each host runs its own engine on its own devices (tensor parallel inside the host) over its share.
    llm = LLM(args.model, dtype=args.dtype, engine_config=engine_config(args, args.dtype))
    host = (jax.process_index(), jax.process_count())
    counts = run_batch(llm, args.input, args.output, host=host)
    print(f"jinfer batch: host {host[0]} of {host[1]}: {counts['completed']} completed, {counts['errors']} errors, "
          f"{counts['skipped']} already done", file=sys.stderr)
    if host[1] > 1:
        distributed.barrier("jinfer-batch-written")
        if host[0] == 0 and not os.path.exists(args.output):
            merge_host_outputs(args.input, args.output, host[1])
        distributed.barrier("jinfer-batch-merged")
    return 0


def cmd_perplexity(args) -> int:
    from jinfer.entrypoints.llm import LLM
    from jinfer.entrypoints.perplexity import perplexity

    _enable_compile_cache()
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization,
              quantization_group_size=args.quantization_group_size, kv_cache_dtype=args.kv_cache_dtype)
    r = perplexity(llm, text, args.window, progress=True)
    print(f"perplexity: {r.perplexity:.4f}\n{r.summary()}")
    return 0


def cmd_convert(args) -> int:
    from jinfer.checkpoints.convert import convert

    out = convert(args.src, args.dst, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def cmd_pull(args) -> int:
    from jinfer.checkpoints.pull import pull

    print(pull(args.name, force=args.force))
    return 0


def cmd_serve(args) -> int:
    from jinfer.serve.main import run

    return run(args)


def cmd_client(args) -> int:
    from jinfer.serve.client_cli import run

    return run(args)


def _model_arguments(p, serve_main, parallel: bool = False) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    serve_main.add_quantization_arguments(p)
    serve_main.add_kv_cache_arguments(p)
    serve_main.add_speculative_arguments(p)
    serve_main.add_engine_arguments(p, parallel=parallel)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jinfer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="jinfer", description="A compiled LLM inference engine on JAX.",
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"jinfer {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    from jinfer.serve import main as serve_main  # its flags: the server's, quantization's for every command
    from jinfer.serve.sampling_flags import add_sampling_arguments

    g = sub.add_parser("generate", formatter_class=fmt, help="generate text from a prompt, streamed to the terminal")
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2",
                   help="registered name (pulled on first use), GGUF file, HF directory or orbax checkpoint")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_arguments(g)
    _model_arguments(g, serve_main)
    g.set_defaults(fn=cmd_generate)

    ch = sub.add_parser("chat", help="an interactive multi-turn chat with a model, in the terminal",
                        formatter_class=fmt)
    ch.add_argument("--model", default="smollm2",
                    help="registered name (pulled on first use), GGUF file, HF directory or orbax checkpoint")
    ch.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_sampling_arguments(ch, max_tokens_help="default: the rest of the context, as the HTTP chat endpoint's")
    _model_arguments(ch, serve_main)
    ch.set_defaults(fn=cmd_chat)

    b = sub.add_parser("batch", formatter_class=fmt,
                        help="offline batch inference: JSONL prompts in, JSONL results out (resumable)")
    b.add_argument("input", help="one JSON object a line: prompt or messages, sampling fields, optional id")
    b.add_argument("output", help="one result a line, in input order; a rerun skips the lines already there")
    b.add_argument("--model", default="smollm2")
    _model_arguments(b, serve_main)
    b.add_argument("--tensor-parallel", type=int, default=1, help="devices per engine (within this host)")
    b.add_argument("--data-parallel", type=int, default=1, help="engine replicas on this host")
    b.add_argument("--coordinator", default=None,
                   help="host:port of process 0 for a multi-host job (or JINFER_COORDINATOR)")
    b.add_argument("--num-processes", type=int, default=None, help="hosts in the job (or JINFER_NUM_PROCESSES)")
    b.add_argument("--process-id", type=int, default=None, help="this host's index (or JINFER_PROCESS_ID)")
    b.set_defaults(fn=cmd_batch)

    pp = sub.add_parser("perplexity", formatter_class=fmt,
                        help="a model's perplexity on a text file (non-overlapping windows)")
    pp.add_argument("file", help="a UTF-8 text file")
    pp.add_argument("--model", default="smollm2")
    pp.add_argument("--window", type=int, default=512, help="tokens per window, each scored alone")
    pp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve_main.add_quantization_arguments(pp)
    serve_main.add_kv_cache_arguments(pp)
    pp.set_defaults(fn=cmd_perplexity)

    from jinfer.entrypoints import quantize

    q = sub.add_parser("quantize", formatter_class=fmt,
                        help="quantize a float checkpoint (rtn, gptq, awq, smoothquant, w8a8) into an "
                                        "orbax checkpoint that loads quantized with no flag")
    quantize.add_arguments(q)
    q.set_defaults(fn=quantize.run)

    c = sub.add_parser("convert", formatter_class=fmt,
                        help="convert a GGUF file or HF directory to an orbax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--force", action="store_true", help="replace an existing destination")
    c.set_defaults(fn=cmd_convert)

    pl = sub.add_parser("pull", formatter_class=fmt,
                        help="download and convert a registered model (e.g. smollm2)")
    pl.add_argument("name", nargs="?", default="smollm2")
    pl.add_argument("--force", action="store_true", help="convert again even if cached")
    pl.set_defaults(fn=cmd_pull)

    m = sub.add_parser("models", formatter_class=fmt,
                        help="list the registered models and those in the cache")
    m.set_defaults(fn=cmd_models)

    from jinfer.serve import client_cli

    sv = sub.add_parser("serve", formatter_class=fmt,
                        help="serve a model over gRPC (warm-up, then serve; SIGTERM drains)")
    serve_main.add_arguments(sv)
    sv.set_defaults(fn=cmd_serve)

    cl = sub.add_parser("client", formatter_class=fmt,
                        help="stream a generation from a jinfer server to the terminal")
    client_cli.add_arguments(cl)
    cl.set_defaults(fn=cmd_client)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jinfer.checkpoints.errors import CheckpointError
    from jinfer.models.config import ConfigError

    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"jinfer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
