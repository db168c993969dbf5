"""Where an engine step's time goes: the compiled step alone (device) vs the whole engine loop (host
included), for a random-weight model at batch-1 decode; also counts KV-cache copies in the compiled HLO.

    python benchmarks/step_profile.py --shape llama-3.1-8b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("JINFER_XLA_DEFAULTS") != "1":  # compare against XLA's own defaults with =1
    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()


def main():
    from benchmarks.model_shapes import SHAPES
    from jinfer.engine.config import EngineConfig
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.runtime.build import build_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--min-bucket", type=int, default=0, help="smallest token bucket (default: the slot count)")
    args = ap.parse_args()
    config = SHAPES[args.shape]
    params = jax.jit(llama.init_params, static_argnums=(0, 2))(config, jax.random.key(0), jnp.dtype(args.dtype))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    ec = EngineConfig(max_slots=args.slots, page_size=16, max_model_len=1024, token_buckets=(max(args.slots, args.min_bucket), 128),
                      max_prefill_chunk=128, dtype=args.dtype, enable_prefix_caching=False)
    eng = build_engine(config, params, None, ec)
    eng.warmup()
    for _ in range(args.slots):
        eng.add_request(list(range(100)), SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True))
    for _ in range(5):
        eng.step()
    # Engine loop, host included.
    t = time.perf_counter()
    n = 100
    for _ in range(n):
        eng.step()
    engine_ms = (time.perf_counter() - t) / n * 1e3
    # The compiled step alone: re-dispatch one decode plan (state threads through; tokens do not matter).
    plan = eng.scheduler.schedule()
    runner = eng.runner
    bucket = runner.bucket(plan.num_tokens)
    dev_args = jax.device_put(runner._step_inputs(plan, bucket, 1))  # (StepInputs, attention metadata)
    state = (runner.kv, runner.last_sampled, runner.output_counts, runner.prompt_mask)
    for _ in range(3):
        *state, out = runner._step(runner.params, *state, *dev_args, max_query_len=1)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(n):
        *state, out = runner._step(runner.params, *state, *dev_args, max_query_len=1)
    jax.block_until_ready(out)
    device_ms = (time.perf_counter() - t) / n * 1e3
    hlo = runner._step.lower(runner.params, *state, *dev_args, max_query_len=1).compile().as_text()
    shape_txt = f"{jnp.dtype(args.dtype).name.replace('bfloat16', 'bf16').replace('float32', 'f32')}[{','.join(map(str, state[0][0].shape))}]"
    copies = [l.strip()[:160] for l in hlo.splitlines() if shape_txt in l and " copy(" in l]
    roofline_ms = weight_bytes / 3.0e12 * 1e3
    print(f"{args.shape} {args.dtype} slots={args.slots} bucket={bucket}: engine step {engine_ms:.2f} ms, compiled step alone "
          f"{device_ms:.2f} ms, weight-read roofline {roofline_ms:.2f} ms at 3 TB/s; KV copies in HLO: {len(copies)}")
    for c in copies[:4]:
        print("  ", c)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "step_hlo.txt"), "w") as f:
        f.write(hlo)


if __name__ == "__main__":
    main()
