"""Offline throughput of the engine: N requests of given input/output lengths submitted at once.

Reports output tokens/s, time to first token and inter-token latency percentiles, and KV page
utilization; with --hf, also Hugging Face transformers' `generate` on the same batch (CPU peer).

    python benchmarks/throughput.py --model smollm2 --num-requests 16 --input-len 128 --output-len 64 --hf
    python benchmarks/throughput.py --shape llama-3.1-8b --dtype bfloat16 --num-requests 128 \
        --input-len 512 --output-len 256 --max-slots 128     # GPU, random weights
    ... --tensor-parallel 2                                  # the same over a 2-device model mesh
    ... --data-parallel 2                                    # two replicas, one device each
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import weight_layout, xla_glue

if os.environ.get("JINFER_XLA_DEFAULTS") != "1":  # compare against XLA's own defaults with =1
    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()


def percentiles(xs, ps=(50, 90, 99)):
    if not xs:
        return "n/a"
    return " ".join(f"p{p}={np.percentile(xs, p) * 1e3:.1f}ms" for p in ps)


def run_engine(config, params, tokenizer, args, prompts):
    from jinfer.engine.config import EngineConfig
    from jinfer.inputs import SamplingParams
    from jinfer.runtime.build import make_engine

    max_len = args.input_len + args.output_len
    ec = EngineConfig(max_slots=args.max_slots, page_size=args.page_size, num_pages=args.num_pages,
                      max_model_len=1 << (max_len - 1).bit_length(), token_buckets=tuple(args.buckets),
                      max_prefill_chunk=args.chunk, dtype=args.dtype, enable_prefix_caching=False,
                      decode_steps=args.decode_steps, quantization=args.quantization,
                      kv_cache_dtype=args.kv_cache_dtype,
                      tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel)
    eng = make_engine(config, params, tokenizer, ec, seed=0)
    replicas = getattr(eng, "replicas", [eng])  # a DataParallelEngine's, or the one engine
    t = time.perf_counter()
    eng.warmup()
    print(f"warm-up: {len(replicas[0].runner.all_shapes())} step shapes x {len(replicas)} replicas compiled in "
          f"{time.perf_counter() - t:.1f}s; {eng.num_pages} KV pages of {args.page_size} tokens a replica")
    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for p in prompts:
        eng.add_request(p, sp)
    outs, util, steps = [], [], 0
    while eng.has_work:
        for ev in eng.step():
            if ev.output.finished:
                outs.append(ev.output)
        util.append(np.mean([1 - e.scheduler.allocator.num_free / e.scheduler.allocator.usable_pages
                             for e in replicas]))
        steps += 1
    wall = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics.time_to_first_token for o in outs]
    itl = [x for o in outs for x in o.metrics.inter_token_latencies]
    print(f"jinfer: {len(outs)} requests, {n_out} output tokens in {wall:.2f}s over {steps} steps "
          f"-> {n_out / wall:.1f} output tok/s")
    print(f"  TTFT {percentiles(ttft)}; ITL {percentiles(itl)}; KV pages used: mean {np.mean(util):.0%}, "
          f"peak {max(util):.0%}; preemptions {sum(e.scheduler.num_preemptions for e in replicas)}")
    return n_out / wall


def run_hf(gguf_path, args, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                             min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t
    n_out = (out.shape[1] - ids.shape[1]) * out.shape[0]
    print(f"transformers generate: {n_out} output tokens in {wall:.2f}s -> {n_out / wall:.1f} output tok/s")
    return n_out / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a loadable model (e.g. smollm2); else --shape")
    ap.add_argument("--shape", default="smollm2-135m", help="random weights of a real shape (benchmarks/model_shapes.py)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-slots", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--buckets", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--quantization", default=None, help="weight format the engine quantizes to (int8, int4, fp8, ...)")
    weight_layout.add_flag(ap)
    xla_glue.add_flag(ap)
    ap.add_argument("--kv-cache-dtype", default=None, help="int8 or fp8 KV pages")
    ap.add_argument("--decode-steps", type=int, default=None, help="EngineConfig.decode_steps (default: platform's)")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="devices the model is split over (jinfer.runtime.sharding)")
    ap.add_argument("--data-parallel", type=int, default=1, help="engine replicas, each on its own devices")
    ap.add_argument("--hf", action="store_true", help="also time transformers generate (needs --model smollm2)")
    args = ap.parse_args()
    weight_layout.apply(args.out_in)
    xla_glue.apply(args)

    from jinfer.models import llama

    dtype = jnp.dtype(args.dtype)
    if args.model:
        from jinfer.checkpoints.load import load

        loaded = load(args.model)
        config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    else:
        from benchmarks.model_shapes import SHAPES

        config, tokenizer = SHAPES[args.shape], None
        params = jax.jit(llama.init_params, static_argnums=(0, 2))(config, jax.random.key(0), dtype)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model {args.model or args.shape} "
          f"({llama.num_params(config) / 1e6:.0f}M params), {args.dtype}; {args.num_requests} requests, "
          f"{args.input_len} in / {args.output_len} out")
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, config.vocab_size, args.input_len))) for _ in range(args.num_requests)]
    ours = run_engine(config, params, tokenizer, args, prompts)
    if args.hf:
        from jinfer.checkpoints.pull import gguf_path

        peer = run_hf(gguf_path(args.model), args, prompts)
        print(f"ratio jinfer / transformers: {ours / peer:.2f}")


if __name__ == "__main__":
    main()
