"""Hopper (Mosaic GPU) flash attention: correctness against the jnp reference and cuDNN, and timings of
block-size variants, on the lent H100.

    python benchmarks/flash_hopper_tune.py [--iters 20] [--device-time]
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import device_time_interleaved, rel_err, timeit_interleaved
from jinfer.kernels.flash_attention import flash_attention_reference
from jinfer.kernels.flash_attention.kernel_hopper import HopperBlockSizes, flash_attention_hopper

CHECKS = [  # (B, S, N, K, H, causal)
    (1, 256, 4, 2, 64, True), (1, 256, 4, 2, 64, False), (2, 384, 4, 4, 128, True), (1, 512, 6, 2, 128, True),
    (1, 512, 9, 3, 64, True), (2, 256, 8, 1, 128, False),
]
VARIANTS = [HopperBlockSizes(persistent=True), HopperBlockSizes(), HopperBlockSizes(persistent=True, pingpong=False),
            HopperBlockSizes(persistent=True, num_stages=3), HopperBlockSizes(num_stages=3),
            HopperBlockSizes(persistent=True, prefetch_q=True)]
CHECKED = 3  # the first variants are also checked for correctness
SHAPES = [(4, 4096), (1, 16384), (16, 1024)]


def run_checks():
    for B, S, N, K, H, causal in CHECKS:
        ks = jax.random.split(jax.random.key(S + N), 3)
        q = jax.random.normal(ks[0], (B, S, N, H), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, S, K, H), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, S, K, H), jnp.bfloat16)
        ref = flash_attention_reference(q, k, v, causal=causal)
        s = jnp.einsum("bqkgh,bskh->bqkgs", q.reshape(B, S, K, N // K, H).astype(jnp.float32),
                       k.astype(jnp.float32)) * H ** -0.5
        if causal:
            s = jnp.where((jnp.arange(S)[:, None] >= jnp.arange(S)[None, :])[None, :, None, None], s, -jnp.inf)
        lse_ref = jax.nn.logsumexp(s, -1).reshape(B, S, N)
        for bs in VARIANTS[:CHECKED]:
            try:
                # else no shared memory is left for the lse tile
                with_lse = bs.num_stages < 3 and not (bs.prefetch_q and H >= 128)
                o = flash_attention_hopper(q, k, v, causal=causal, sm_scale=H ** -0.5, block_sizes=bs,
                                           return_lse=with_lse)
                lse_err = float(jnp.abs(o[1] - lse_ref).max()) if with_lse else float("nan")
                o = o[0] if with_lse else o
                print(f"check B={B} S={S} N={N} K={K} H={H} causal={causal} {bs}: rel err {rel_err(o, ref):.1e}, "
                      f"lse max err {lse_err:.1e}")
            except Exception:
                print(f"check B={B} S={S} N={N} K={K} H={H} causal={causal} {bs}: FAILED")
                traceback.print_exc(limit=3)


def run_timings(iters, device_time: bool):
    N, K, H = 32, 8, 128
    for B, S in SHAPES:
        ks = jax.random.split(jax.random.key(B * S), 3)
        q = jax.random.normal(ks[0], (B, S, N, H), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, S, K, H), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, S, K, H), jnp.bfloat16)
        flops = 4 * B * S * S * N * H / 2
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        ref = cudnn(q, k, v)
        fns, errs = {"cuDNN": lambda: cudnn(q, k, v)}, {}
        for bs in VARIANTS:
            try:
                f = jax.jit(lambda q, k, v, bs=bs: flash_attention_hopper(q, k, v, causal=True, sm_scale=H ** -0.5,
                                                                         block_sizes=bs))
                errs[bs] = rel_err(f(q, k, v), ref)
                fns[bs] = lambda f=f: f(q, k, v)
            except Exception as e:
                print(f"  {bs}: FAILED {type(e).__name__}: {str(e)[:300]}")
        times = timeit_interleaved(fns, iters)
        dev = device_time_interleaved(fns) if device_time else {}
        t_c, d_c = times.pop("cuDNN"), dev.pop("cuDNN", float("nan"))
        print(f"B={B} S={S}: cuDNN {t_c * 1e3:.3f} ms {flops / t_c / 1e12:.0f} TFLOP/s (device {d_c * 1e3:.3f} ms)")
        for bs, t in times.items():
            d = dev.get(bs, float("nan"))
            print(f"  {bs}: {t * 1e3:.3f} ms {flops / t / 1e12:.0f} TFLOP/s  cuDNN/ours {t_c / t:.2f}  "
                  f"device {d * 1e3:.3f} ms, cuDNN/ours {d_c / d:.3f}  err vs cuDNN {errs[bs]:.1e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--device-time", action="store_true", help="also device time, traced in turn (profiler)")
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    run_checks()
    if not a.checks_only:
        run_timings(a.iters, a.device_time)
