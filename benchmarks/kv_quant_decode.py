"""Paged decode attention on the GPU with a quantized KV cache (kv_cache_dtype int8 / fp8) against bf16 pages:
device time of the Triton kernel (plus its split combine), the bytes it must read and the TB/s that makes, and
the output's distance from the reference reading the same pages (native, not interpreted).

    python benchmarks/kv_quant_decode.py

Llama-3.1-8B's attention shape (32 query heads over 8 KV heads, head dim 128), pages of 16 (the engine's
default), the engine's decode block sizes (`tuning.gpu_block_sizes`).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_tune import decode_inputs
from benchmarks.gpu_trace import kernel_times
from benchmarks.kernels import HEAD_DIM, KV_HEADS, N_HEADS
from jinfer.kernels.paged_attention import kernel as pk
from jinfer.kernels.paged_attention.query_layout import query_blocks
from jinfer.kernels.paged_attention.reference import ragged_paged_attention_reference
from jinfer.kernels.paged_attention.tuning import gpu_block_sizes
from jinfer.quant.kv import QuantizedKV, quantize_kv


def main():
    ps = 16
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for B, ctx in ((1, 4096), (8, 4096), (64, 4096)):
        q, kp, vp, pt, kv_len, ql = decode_inputs(B, ctx, ps, rng)
        bs, _ = gpu_block_sizes(KV_HEADS, N_HEADS, B, ps)
        blocks, (tb, tr) = query_blocks(np.arange(B, dtype=np.int32), ql, bs.block_q, B, B)
        meta = (jnp.int32(0), pt, kv_len, jnp.asarray(ql), tuple(jnp.asarray(x) for x in blocks), jnp.asarray(tb),
                jnp.asarray(tr))
        f = jax.jit(lambda q, k, v, meta, bs=bs: pk.ragged_paged_attention_triton(
            q, k, v, *meta, num_blocks=B, block_sizes=bs, interpret=False), static_argnames="bs")
        ref = jax.jit(lambda q, k, v: ragged_paged_attention_reference(
            q, k, v, pt, kv_len, jnp.arange(B, dtype=jnp.int32), jnp.asarray(ql), max_query_len=1,
            layer=jnp.int32(0)))
        base = None
        for fmt, keys in ((None, None), ("int8", None), ("int8", 128), ("int8", 256), ("fp8", None), ("fp8", 128)):
            k, v = (kp, vp) if fmt is None else (QuantizedKV(*quantize_kv(x, fmt)) for x in (kp, vp))
            per_token = HEAD_DIM * 2 if fmt is None else HEAD_DIM + 4
            nbytes = 2 * B * ctx * KV_HEADS * per_token
            sizes = bs if keys is None else dataclasses.replace(bs, pages_per_block=keys // ps)
            us = sum(t for _, t in kernel_times(lambda: f(q, k, v, meta, sizes), iters=20))
            out, want = f(q, k, v, meta, sizes), ref(q, k, v)
            err = float(jnp.linalg.norm((out - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
            base = base or us
            print(f"B={B:3d} ctx={ctx} {fmt or 'bf16':5s} keys/step={sizes.pages_per_block * ps:3d}: {us:8.1f} us  "
                  f"{nbytes / us / 1e6:5.2f} TB/s  {base / us:4.2f}x bf16  rel err vs reference {err:.1e}")


if __name__ == "__main__":
    main()
