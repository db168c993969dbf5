"""Engine vs the dense-cache reference loop, greedy, on random-weight models (run on any backend).

    python benchmarks/engine_exactness.py [--shape smollm2-135m] [--requests 24] [--pages 64]

Prints how many requests' tokens match the reference exactly; float32 should give all of them.
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
if os.environ.get("JINFER_XLA_DEFAULTS") != "1":  # compare against XLA's own defaults with =1
    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()


def main():
    from benchmarks.model_shapes import SHAPES
    from jinfer.engine.config import EngineConfig
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.runtime import reference
    from jinfer.runtime.build import build_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--pages", type=int, default=64, help="small enough to force preemption")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    config = SHAPES[args.shape]
    dtype = jnp.dtype(args.dtype)
    params = jax.jit(llama.init_params, static_argnums=(0, 2))(config, jax.random.key(1), dtype)
    ec = EngineConfig(max_slots=8, page_size=16, num_pages=args.pages, max_model_len=512, token_buckets=(16, 64, 256),
                      max_prefill_chunk=64, dtype=args.dtype)
    eng = build_engine(config, params, None, ec, seed=0)
    eng.warmup()
    rng = np.random.default_rng(0)
    shared = list(map(int, rng.integers(0, config.vocab_size, 100)))
    prompts = [shared[: int(rng.integers(0, 100))] + list(map(int, rng.integers(0, config.vocab_size, int(rng.integers(1, 120)))))
               for _ in range(args.requests)]
    sps = [SamplingParams(max_tokens=int(rng.integers(1, 64)), temperature=0.0, ignore_eos=True) for _ in prompts]
    t = time.perf_counter()
    arrival = {i: int(rng.integers(0, 20)) for i in range(len(prompts))}
    ids, outs, step = {}, {}, 0
    while len(ids) < len(prompts) or eng.has_work:
        for i in [i for i, s in arrival.items() if s == step]:
            ids[i] = eng.add_request(prompts[i], sps[i])
        for ev in eng.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output.token_ids
        step += 1
    t_eng = time.perf_counter() - t
    want = reference.generate(params, config, prompts, sps)
    same = sum(outs[ids[i]] == w.token_ids for i, w in enumerate(want))
    s = eng.scheduler
    print(f"engine vs reference ({args.shape}, {args.dtype}, jax {jax.__version__} on {jax.devices()[0].platform}): "
          f"{same}/{len(prompts)} requests identical; {s.num_preemptions} preemptions, prefix hit rate "
          f"{eng.load().prefix_hit_rate:.0%}, {step} steps in {t_eng:.1f}s; compilations {eng.runner.num_compilations}"
          f" (shapes {len(eng.runner.all_shapes())}); pages back: {s.allocator.num_free + s.prefix_cache.num_evictable}"
          f"/{s.allocator.usable_pages}")


if __name__ == "__main__":
    main()
