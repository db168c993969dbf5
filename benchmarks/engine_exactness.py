"""Engine vs the dense-cache reference loop, greedy, on random-weight models (run on any backend).

    python benchmarks/engine_exactness.py [--shape smollm2-135m] [--requests 24] [--pages 64]
        [--quantization int8|int4|fp8] [--kv-cache-dtype int8|fp8] [--speculative ngram|early_exit]
        [--tensor-parallel 2 --shape llama-3.2-1b]

Prints how many requests' tokens match the reference exactly; float32 should give all of them. For each request
that differs it prints where it first does, the two tokens, and how far apart the reference puts their logits
there (the sequence so far in one pass, with float KV and with the run's quantized KV) beside its top-2 margin:
a gap near zero is a near tie that any change of summation order may flip, a large one a real difference. With quantized
weights the reference runs the same quantized params (through XLA's dequantize-then-dot, where the engine on one
GPU uses the Pallas kernel), with quantized KV it stores K/V as the quantized pages give them back. With
--speculative the engine verifies k = 4 proposals whenever it has any (prompt lookup down to one-token matches, or
early exit at half the layers; the adaptive policy off), so greedy output must still equal the reference's.
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


def main():
    from benchmarks.model_shapes import SHAPES
    from jinfer.engine.config import EngineConfig
    from jinfer.engine.spec.config import SpeculativeConfig
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.runtime import reference
    from jinfer.runtime.build import build_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--pages", type=int, default=64, help="small enough to force preemption")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default=None, help="weights: int8, int4, fp8 (round to nearest)")
    weight_layout.add_flag(ap)
    xla_glue.add_flag(ap)
    ap.add_argument("--kv-cache-dtype", default=None, help="int8 or fp8 KV pages")
    ap.add_argument("--speculative", default=None, choices=["ngram", "early_exit"])
    ap.add_argument("--tensor-parallel", type=int, default=1, help="the engine over a (model=N) mesh; the reference "
                                                                   "on one device (llama-3.2-1b's 8 KV heads split)")
    args = ap.parse_args()
    weight_layout.apply(args.out_in)
    xla_glue.apply(args)
    config = SHAPES[args.shape]
    dtype = jnp.dtype(args.dtype)
    params = jax.jit(llama.init_params, static_argnums=(0, 2))(config, jax.random.key(1), dtype)
    spec = None
    if args.speculative:
        extra = (dict(prompt_lookup_min=1) if args.speculative == "ngram"
                 else dict(early_exit_layers=max(1, config.num_layers // 2)))
        spec = SpeculativeConfig(method=args.speculative, num_speculative_tokens=4, adaptive=False,
                                 disable_by_batch_size=8, verify_step_cost=0.0, verify_token_cost=0.0, draft_cost=0.0,
                                 **extra)
    ec = EngineConfig(max_slots=8, page_size=16, num_pages=args.pages, max_model_len=512, token_buckets=(16, 64, 256),
                      max_prefill_chunk=64, dtype=args.dtype, quantization=args.quantization,
                      kv_cache_dtype=args.kv_cache_dtype, speculative=spec, tensor_parallel=args.tensor_parallel)
    eng = build_engine(config, params, None, ec, seed=0)
    eng.warmup()
    rng = np.random.default_rng(0)
    shared = list(map(int, rng.integers(0, config.vocab_size, 100)))
    prompts = [shared[: int(rng.integers(0, 100))] + list(map(int, rng.integers(0, config.vocab_size, int(rng.integers(1, 120)))))
               for _ in range(args.requests)]
    sps = [SamplingParams(max_tokens=int(rng.integers(1, 64)), temperature=0.0, ignore_eos=True) for _ in prompts]
    t = time.perf_counter()
    arrival = {i: int(rng.integers(0, 20)) for i in range(len(prompts))}
    ids, outs, metrics, step = {}, {}, {}, 0
    while len(ids) < len(prompts) or eng.has_work:
        for i in [i for i, s in arrival.items() if s == step]:
            ids[i] = eng.add_request(prompts[i], sps[i])
        for ev in eng.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output.token_ids
                metrics[ev.request_id] = ev.output.metrics
        step += 1
    t_eng = time.perf_counter() - t
    if args.quantization:  # the same quantized weights as the engine's (on one GPU, fused and with the norms folded)
        from jinfer.runtime.runner import prepare_weights

        r = eng.runner
        params = prepare_weights(params, ec, r.ops, fuse=r.mesh is None and r.ops.fuse)
    want = reference.generate(params, config, prompts, sps, kv_cache_dtype=args.kv_cache_dtype)
    same = sum(outs[ids[i]] == w.token_ids for i, w in enumerate(want))
    for i, w in enumerate(want):
        got = outs[ids[i]]
        if got != w.token_ids:
            d = next((j for j, (a, b) in enumerate(zip(got, w.token_ids)) if a != b), min(len(got), len(w.token_ids)))
            if d < min(len(got), len(w.token_ids)):
                seq = prompts[i] + w.token_ids[:d]
                gaps = []
                for kv in dict.fromkeys([None, args.kv_cache_dtype]):  # float KV, then the run's quantized KV
                    logits = reference.full_logits(params, config, seq, kv)[-1]
                    top2 = np.sort(logits)[-2:]
                    gaps.append(f"{kv or 'float'} KV: {logits[w.token_ids[d]]:.4f} vs {logits[got[d]]:.4f} (gap "
                                f"{logits[w.token_ids[d]] - logits[got[d]]:.2e}, top-2 margin {top2[1] - top2[0]:.2e})")
                print(f"request {i}: first differs at output token {d} of {len(w.token_ids)}: reference "
                      f"{w.token_ids[d]}, engine {got[d]}; reference logits, " + "; ".join(gaps))
            else:
                print(f"request {i}: {len(got)} tokens, the reference {len(w.token_ids)} (same up to the shorter)")
    s = eng.scheduler
    if args.speculative:
        verify, drafted, accepted = (sum(getattr(m, f) for m in metrics.values()) for f in
                                     ("spec_verify_steps", "spec_draft_tokens", "spec_accepted_tokens"))
        print(f"speculation ({args.speculative}, k = 4): {verify} verify steps, {accepted}/{drafted} proposals "
              f"accepted")
    fmt = f"{args.dtype}, weights {args.quantization or args.dtype}, KV {args.kv_cache_dtype or args.dtype}"
    fmt += f", model={args.tensor_parallel} ({type(eng.runner.attention).__name__})" if args.tensor_parallel > 1 else ""
    print(f"engine vs reference ({args.shape}, {fmt}, jax {jax.__version__} on {jax.devices()[0].platform}): "
          f"{same}/{len(prompts)} requests identical; {s.num_preemptions} preemptions, prefix hit rate "
          f"{eng.load().prefix_hit_rate:.0%}, {step} steps in {t_eng:.1f}s; compilations {eng.runner.num_compilations}"
          f" (shapes {len(eng.runner.all_shapes())}); pages back: {s.allocator.num_free + s.prefix_cache.num_evictable}"
          f"/{s.allocator.usable_pages}")


if __name__ == "__main__":
    main()
