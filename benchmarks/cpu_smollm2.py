"""SmolLM2-135M on the CPU: prefill tokens/s (one 512-token prompt) and decode tokens/s (batch 1 and 8),
jinfer's reference loop beside Hugging Face transformers (PyTorch, same GGUF, same dtype) in the same run.

    python benchmarks/cpu_smollm2.py [--dtype float32] [--iters 5] [--no-hf]

The roofline on a CPU is loose (memory bandwidth for decode: 135M params x 4 bytes per step), so the
peer is the comparison: the ratio printed is jinfer / transformers (above 1 is faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_LEN = 512
DECODE_STEPS = 32
CACHE_LEN = 1024


def _median_time(fn, iters: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_jinfer(config, params, rng, iters):
    from jinfer.models.attention import dense_kv_cache
    from jinfer.runtime.reference import forward_step

    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    out = {}
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, PROMPT_LEN)), jnp.int32)
    positions = jnp.arange(PROMPT_LEN, dtype=jnp.int32)[None]

    def prefill():
        cache = dense_kv_cache(config.num_layers, 1, CACHE_LEN, config.num_kv_heads, config.head_dim, dtype)
        logits, cache = forward_step(params, tokens, positions, jnp.array([PROMPT_LEN - 1]), cache, config=config)
        jax.block_until_ready(logits)

    out["prefill"] = PROMPT_LEN / _median_time(prefill, iters)
    for batch in (1, 8):
        cache = dense_kv_cache(config.num_layers, batch, CACHE_LEN, config.num_kv_heads, config.head_dim, dtype)
        toks = jnp.asarray(rng.integers(0, config.vocab_size, (batch, 1)), jnp.int32)
        state = {"cache": cache}

        def decode():
            for step in range(DECODE_STEPS):
                pos = jnp.full((batch, 1), PROMPT_LEN + step, jnp.int32)
                logits, state["cache"] = forward_step(params, toks, pos, jnp.zeros(batch, jnp.int32),
                                                       state["cache"], config=config)
                jnp.argmax(logits, -1).block_until_ready()  # the loop needs each token on the host

        out[f"decode_b{batch}"] = batch * DECODE_STEPS / _median_time(decode, iters)
    return out


def bench_hf(gguf_path, torch_dtype, config, rng, iters):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
    model.eval()
    out = {}
    ids = torch.tensor(rng.integers(0, config.vocab_size, (1, PROMPT_LEN)))

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)

    out["prefill"] = PROMPT_LEN / _median_time(prefill, iters)
    for batch in (1, 8):
        prompt = torch.tensor(rng.integers(0, config.vocab_size, (batch, PROMPT_LEN)))
        with torch.no_grad():
            base = model(prompt, use_cache=True).past_key_values
        toks = torch.tensor(rng.integers(0, config.vocab_size, (batch, 1)))

        def decode():
            cache = DynamicCache()
            for layer, (k, v) in enumerate(zip(base.key_cache, base.value_cache)) if hasattr(base, "key_cache") else \
                    enumerate((lyr.keys, lyr.values) for lyr in base.layers):
                cache.update(k.clone(), v.clone(), layer)
            with torch.no_grad():
                for _ in range(DECODE_STEPS):
                    res = model(toks, past_key_values=cache, use_cache=True)
                    res.logits[:, -1].argmax(-1)

        out[f"decode_b{batch}"] = batch * DECODE_STEPS / _median_time(decode, iters)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()

    from jinfer.checkpoints.gguf_import import load_gguf
    from jinfer.checkpoints.pull import gguf_path

    path = gguf_path("smollm2")
    config, params, _ = load_gguf(path)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; dtype {args.dtype}")
    ours = bench_jinfer(config, params, rng, args.iters)
    peer = None
    if not args.no_hf:
        import torch

        peer = bench_hf(path, {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype],
                        config, rng, args.iters)
    print(f"{'metric':<28}{'jinfer':>12}{'transformers':>14}{'ratio':>8}")
    names = {"prefill": f"prefill tok/s ({PROMPT_LEN} tok)", "decode_b1": "decode tok/s, batch 1",
             "decode_b8": "decode tok/s, batch 8"}
    for key, label in names.items():
        p = peer[key] if peer else float("nan")
        print(f"{label:<28}{ours[key]:>12.1f}{p:>14.1f}{ours[key] / p:>8.2f}")


if __name__ == "__main__":
    main()
