"""Block sizes of the paged decode kernel on the GPU, judged by device time (the sum of the GPU kernels
of one call, from a profiler trace: inside the engine's jitted step there is no per-call host dispatch).

    python benchmarks/decode_tune.py [--page-size 64]

Prints, per (batch, context), the best configurations' device time and TB/s of K/V read, best first, with
the launches of the best one.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_trace import kernel_times
from benchmarks.kernels import HEAD_DIM, KV_HEADS, N_HEADS
from jinfer.kernels.paged_attention import kernel as pk
from jinfer.kernels.paged_attention.query_layout import query_blocks

SWEEP = {  # (batch, context): (context splits, keys per inner step, warps) tried; stages 1, 2 and 3 each
    # Batch-1 chat lengths: whether a short context pays for splitting (and the combine's launch) at all.
    (1, 256): ((1, 4, 16, 64), (64, 128), (4,)),
    (1, 1024): ((1, 4, 16, 64), (64, 128), (4,)),
    (1, 4096): ((32, 48, 64, 128), (64, 128), (2, 4, 8)),
    (8, 32768): ((2, 4, 8), (64, 128), (4,)),
    (64, 4096): ((1, 2, 4), (64, 128, 256), (4, 8)),
    (128, 2048): ((1, 2), (64, 128, 256), (4, 8)),  # the 128-request throughput workload's decode
}


def decode_inputs(B: int, ctx: int, ps: int, rng: np.random.Generator):
    """Fresh random bf16 pages for B sequences of ctx tokens each (pages in a random order, page 0 unused)
    and one query per sequence -> (q, k_pages, v_pages, page_table, kv_len, query_len)."""
    pages = ctx // ps
    P = B * pages + 1
    k1, k2, k3 = jax.random.split(jax.random.key(B), 3)
    kp = jax.random.normal(k1, (1, KV_HEADS, P, ps, HEAD_DIM), jnp.bfloat16)
    vp = jax.random.normal(k2, (1, KV_HEADS, P, ps, HEAD_DIM), jnp.bfloat16)
    q = jax.random.normal(k3, (B, N_HEADS, HEAD_DIM), jnp.bfloat16)
    pt = jnp.asarray(rng.permutation(np.arange(1, P))[: B * pages].reshape(B, pages), jnp.int32)
    return q, kp, vp, pt, jnp.full((B,), ctx, jnp.int32), np.ones(B, np.int32)


def device_us(fn) -> tuple[float, list]:
    times = kernel_times(fn, iters=10)
    return sum(us for _, us in times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--page-size", type=int, nargs="+", default=[64])
    ap.add_argument("--batch", type=int, nargs="*", help="only these batch sizes of the sweep")
    ap.add_argument("--context", type=int, nargs="*", help="only these context lengths of the sweep")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--unmasked", type=int, nargs="+", default=[0, 1],
                    help="BlockSizes.unmasked_steps values to try (0: one masked loop; 1: unmasked steps apart)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for ps, ((B, ctx), (split_options, kps_options, warp_options)) in itertools.product(a.page_size, SWEEP.items()):
        if (a.batch and B not in a.batch) or (a.context and ctx not in a.context):
            continue
        ppb_options = sorted({max(1, k // ps) for k in kps_options})
        q, kp, vp, pt, kv_len, ql = decode_inputs(B, ctx, ps, rng)
        bytes_kv = 2 * B * ctx * KV_HEADS * HEAD_DIM * 2
        results = []
        for splits, ppb, warps, stages, unmasked in itertools.product(split_options, ppb_options, warp_options,
                                                                      a.stages, a.unmasked):
            bs = pk.BlockSizes(block_q=4, pages_per_block=ppb, num_splits=splits, num_warps=warps, num_stages=stages,
                               unmasked_steps=bool(unmasked))
            nb = B  # a decode step: one query block per slot (PallasBackend.num_blocks at width 1)
            blocks, (tb, tr) = query_blocks(np.arange(B, dtype=np.int32), ql, bs.block_q, nb, B)
            # step metadata as arguments, as in the engine's step (not constants folded into the call)
            meta = (jnp.int32(0), pt, kv_len, jnp.asarray(ql), tuple(jnp.asarray(x) for x in blocks), jnp.asarray(tb),
                    jnp.asarray(tr))
            f = jax.jit(lambda q, k, v, meta, bs=bs, nb=nb: pk.ragged_paged_attention_triton(
                q, k, v, *meta, num_blocks=nb, block_sizes=bs, interpret=False))
            try:
                us, launches = device_us(lambda: f(q, kp, vp, meta))
            except Exception as e:
                print(f"  {bs}: failed {type(e).__name__}: {str(e)[:100]}")
                continue
            results.append((us, bs, launches))
        results.sort(key=lambda r: r[0])
        print(f"decode B={B} ctx={ctx} page={ps}:")
        if not results:
            print("  no variant ran (each failure above)")
            continue
        for us, bs, _ in results[:8]:
            print(f"  {us:8.1f} us device  {bytes_kv / us / 1e6:5.2f} TB/s  splits={bs.num_splits} "
                  f"ppb={bs.pages_per_block} warps={bs.num_warps} stages={bs.num_stages} unmasked={int(bs.unmasked_steps)}")
        for name, us in results[0][2]:
            print(f"      {us:7.1f} us  {name[:90]}")
        best = results[0][1]
        if best.num_splits > 1:  # the split combine's launch width, on the best configuration
            for cw in (1, 2, 4, 8):
                bs = dataclasses.replace(best, combine_warps=cw)
                f = jax.jit(lambda q, k, v, meta, bs=bs: pk.ragged_paged_attention_triton(
                    q, k, v, *meta, num_blocks=B, block_sizes=bs, interpret=False))
                us, launches = device_us(lambda: f(q, kp, vp, meta))
                print(f"    combine_warps={cw}: {us:6.1f} us ({', '.join(f'{n[:24]} {t:.1f}' for n, t in launches)})")


if __name__ == "__main__":
    main()
