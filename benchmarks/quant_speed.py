"""Decode speed of each weight and KV-cache format on this machine, beside float32 in the same run.

    python benchmarks/quant_speed.py [--model smollm2] [--rounds 2] [--iters 3] [--new 64]
                                     [--only float32,int8,...] [--ckpt awq=DIR --ckpt gptq=DIR ...]

Every format is an engine built as a user asks for it (`LLM(model, quantization=..., kv_cache_dtype=...)`, or
`LLM(DIR)` for a checkpoint `jinfer quantize` wrote: give those with --ckpt name=DIR). All engines are built
first, then the rounds take them in turn (a shared machine's speed drifts over minutes); each figure is
the median over --iters timed runs after a warm-up, and the ratio to float32 is of the same round.
Workloads: decode_b1 (one request, 16 prompt tokens, --new new tokens, greedy, EOS ignored) and decode_b8
(eight such requests at once): new tokens / wall s. Fresh random prompts on every run.
Also printed: the bytes of the layers' matmul weights and the KV bytes per token, from the arrays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORMATS = {  # name: LLM keyword arguments
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "fp8": {"quantization": "fp8"},
    "int4 g128": {"quantization": "int4", "quantization_group_size": 128},
    "int4 g32": {"quantization": "int4", "quantization_group_size": 32},
    "gguf": {"quantization": "gguf"},
    "kv int8": {"kv_cache_dtype": "int8"},
    "kv fp8": {"kv_cache_dtype": "fp8"},
}
WORKLOADS = {"decode_b1": 1, "decode_b8": 8}


def kv_bytes_per_token(llm) -> int:
    """Bytes of one token's K and V in this engine's pool (scales included), from the pool's own arrays."""
    import jax

    leaves = jax.tree_util.tree_leaves(llm.engine.runner.kv)
    values = leaves[0]  # [L, K, P, page_size, H] (a quantized pool's values come first)
    return sum(x.size * x.dtype.itemsize for x in leaves) // (values.shape[2] * values.shape[3])


def main():
    import jax

    from jinfer.entrypoints.llm import LLM
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.quant.params import param_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--only", default=",".join(FORMATS))
    ap.add_argument("--ckpt", action="append", default=[], help="name=DIR of a checkpoint jinfer quantize wrote")
    args = ap.parse_args()

    specs = {name: (args.model, FORMATS[name]) for name in args.only.split(",") if name}
    for item in args.ckpt:
        name, path = item.split("=", 1)
        specs[name] = (path, {})
    print(f"jax {jax.__version__}; {args.model}; {os.cpu_count()} cores; {args.rounds} rounds x {args.iters} runs; "
          f"16 prompt tokens, {args.new} new", flush=True)
    engines = {}
    # Only the shapes these workloads use (decode blocks of 1 and 8 rows, one prefill step of 8 x 16 prompt
    # tokens), so that building a dozen engines does not take a quarter of an hour; the decode steps are the
    # defaults' own.
    from jinfer.engine.config import EngineConfig

    small = EngineConfig(max_slots=8, decode_buckets=(1, 8), token_buckets=(128,))
    for name, (model, kw) in specs.items():
        t = time.perf_counter()
        llm = LLM(model, engine_config=small, **kw)
        layers = llm.engine.runner.params["layers"]
        layers = layers if isinstance(layers, dict) else {n: [w[n] for w in layers] for n in layers[0]}
        mm = param_bytes({n: layers[n] for n in llama.MATMUL_INPUT_AXES})
        engines[name] = llm
        print(f"built {name:<14} in {time.perf_counter() - t:5.0f} s: matmul weights {mm / 1e6:6.1f} MB, "
              f"KV {kv_bytes_per_token(llm):7.1f} B/token", flush=True)

    greedy = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    vocab = next(iter(engines.values())).config.vocab_size
    results = {name: {w: [] for w in WORKLOADS} for name in engines}
    rng = np.random.default_rng(0)
    for r in range(args.rounds):
        for name, llm in engines.items():
            for w, n in WORKLOADS.items():
                def run():
                    prompts = [[int(t) for t in rng.integers(100, vocab, 16)] for _ in range(n)]
                    t = time.perf_counter()
                    llm.generate(prompts, greedy, use_tqdm=False)
                    return n * args.new / (time.perf_counter() - t)

                run()
                results[name][w].append(statistics.median(run() for _ in range(args.iters)))
        print(f"round {r + 1}: " + ", ".join(f"{n} {results[n]['decode_b1'][-1]:.1f}" for n in engines), flush=True)

    base = results.get("float32")
    print(f"\n{'format':<14} " + " ".join(f"{w + ' tok/s':>16} {'x f32':>6}" for w in WORKLOADS))
    for name, res in results.items():
        cells = []
        for w in WORKLOADS:
            med = statistics.median(res[w])
            ratio = statistics.median(a / b for a, b in zip(res[w], base[w])) if base else float("nan")
            cells.append(f"{med:>16.1f} {ratio:>6.2f}")
        print(f"{name:<14} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
