"""Speculative decoding's ceiling on a random-weight model, where real proposals would never be accepted: the
verify step's cost for k = 1..8 proposed tokens beside a plain decode, and the end-to-end speed when every
proposal is right (a *replayed* output: the proposer hands back the target's own greedy tokens from a first run
without speculation), plus the speed the measured acceptance rates would give.

    python benchmarks/spec_ceiling.py --shape llama-3.1-8b --dtype bfloat16 [--ks 1,2,4,8] [--input-len 128]
        [--output-len 256] [--acceptance 0.44,0.03] [--rounds 30]

Batch 1, greedy, EOS ignored; times are of the decode phase (after the first token). Each engine is built as the user's engine is (speculative_config method
"ngram" with fixed k, adaptive policy off), then its host proposer is replaced by the replay. Per k it prints
tok/s, the engine steps, the ms a verify step takes (wall / steps) against a decode step's, and for each
acceptance rate a the estimate tokens-per-verify(a, k) x decode-step ms / verify-step ms (i.i.d. acceptance,
tokens per verify = (1 - a^(k+1)) / (1 - a)) as the speedup over plain decode.
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
if os.environ.get("JINFER_XLA_DEFAULTS") != "1":
    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()


class ReplayProposer:
    """Proposes the known continuation of a sequence (prompt + the target's greedy output)."""

    def __init__(self, full: list[int]):
        self.full = full

    def propose(self, token_ids, k: int) -> list[int]:
        n = len(token_ids)
        return self.full[n:n + k] if list(token_ids) == self.full[:n] else []


def tokens_per_verify(a: float, k: int) -> float:
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def main():
    from benchmarks.model_shapes import SHAPES
    from jinfer.engine.config import EngineConfig
    from jinfer.engine.spec.config import SpeculativeConfig
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.runtime.build import build_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=30, help="replays of the speculating engine's own output")
    ap.add_argument("--acceptance", default="0.44,0.03",
                    help="rates to estimate with (defaults: prompt lookup on SmolLM2's grounded and chat workloads, "
                         "benchmarks/RESULTS.md session 26)")
    args = ap.parse_args()
    config = SHAPES[args.shape]
    params = jax.jit(llama.init_params, static_argnums=(0, 2))(config, jax.random.key(0), jnp.dtype(args.dtype))
    prompt = list(map(int, np.random.default_rng(0).integers(0, config.vocab_size, args.input_len)))
    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    pages = -(-(args.input_len + args.output_len + 16) // 16) + 4
    max_len = 1 << (args.input_len + args.output_len + 16 - 1).bit_length()

    def build(spec=None):
        ec = EngineConfig(max_slots=1, page_size=16, num_pages=pages, max_model_len=max_len, dtype=args.dtype,
                          token_buckets=(16, args.input_len), enable_prefix_caching=False, speculative=spec)
        eng = build_engine(config, params, None, ec, seed=0)
        eng.warmup()
        return eng

    def run(eng):
        eng.add_request(prompt, sp)
        t, steps, out, ttft = time.perf_counter(), 0, None, None
        while eng.has_work:
            for ev in eng.step():
                if ev.output.finished:
                    out, ttft = list(ev.output.token_ids), ev.output.metrics.time_to_first_token
            steps += 1
        return out, time.perf_counter() - t - ttft, steps  # after the first token: the phase speculation speeds up

    def timed(eng, replay=None):
        if replay is not None:
            eng.scheduler.proposer = ReplayProposer(replay)
        run(eng)  # warms the caches
        return run(eng)

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.shape} {args.dtype}; batch 1, "
          f"{args.input_len} in / {args.output_len} out, greedy; proposals replay the target's own output")
    n = args.output_len - 1  # tokens after the first
    base, wall, steps = timed(build())
    # A block of decode_steps tokens is one engine step: per decode token, not per engine step.
    t_decode = wall / n
    print(f"no speculation: {n / wall:7.1f} decode tok/s ({t_decode * 1e3:.2f} ms a token, {steps} steps)")
    rates = [float(a) for a in args.acceptance.split(",") if a]
    for k in map(int, args.ks.split(",")):
        spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k, adaptive=False,
                                 disable_by_batch_size=1).resolve(jax.default_backend())
        eng = build(spec)
        # In bfloat16 a verify step's k + 1 rows round differently from one decode row, so the target's greedy
        # output under speculation can part from the plain run's at a near tie; the replay then proposes
        # nothing. Replaying the speculating engine's own last output until it repeats itself restores the
        # ceiling (each round keeps at least the agreeing prefix); the last replay is the one timed.
        replay, note = base, ""
        for rnd in range(args.rounds):
            eng.scheduler.proposer = ReplayProposer(prompt + replay)
            out = run(eng)[0]
            if out == replay:
                break
            if rnd < 3 or rnd == args.rounds - 1:
                first = next((i for i, (a, b) in enumerate(zip(out, replay)) if a != b), len(out))
                note += f" round {rnd + 1}: parts from its replay at token {first};"
            replay = out
        note += f" {rnd + 1} rounds;"
        out, wall, steps = timed(eng, prompt + replay)
        # The prefill step is one of the steps; the rest verify (k + 1 tokens each when every proposal is right).
        t_verify = wall / max(steps - 1, 1)
        est = ", ".join(f"a={a}: {tokens_per_verify(a, k) * t_decode / t_verify:.2f}x" for a in rates)
        same = "identical to" if out == base else "differs from"
        print(f"k={k}: {n / wall:7.1f} decode tok/s ({n / wall * t_decode:.2f}x), {steps} steps, "
              f"verify step {t_verify * 1e3:.2f} ms = {t_verify / t_decode:.2f} decode tokens; output {same} the "
              f"plain run's;{note} estimate at measured acceptance: {est}", flush=True)


if __name__ == "__main__":
    main()
