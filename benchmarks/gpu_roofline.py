"""The ceilings every GPU figure is a ratio to, measured in the same run: device copy bandwidth (read + write
bytes over time; through PyTorch where it imports, since a jnp elementwise copy reached only ~75% of it on
the H200) and the bf16 matmul rate in jax.

    python benchmarks/gpu_roofline.py [--gb 2] [--n 8192]

Prints one line each; `measure()` returns them for scripts that print ratios.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_seconds(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_bandwidth_torch(gb: float, iters: int = 20) -> float | None:
    """Bytes/s of a device-to-device copy (read + write), best of `iters`; None without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gb * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / best


def copy_bandwidth_jax(gb: float, iters: int = 20) -> float:
    """Bytes/s of a jnp elementwise op over `gb` GiB of bf16 (read + write), median."""
    x = jax.random.normal(jax.random.key(0), (int(gb * 2**30) // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)  # not a plain copy, which XLA could elide
    return 2 * x.nbytes / _median_seconds(lambda: f(x), iters)


def matmul_rate(n: int, iters: int = 20) -> float:
    """FLOP/s of an n x n x n bf16 matmul in jax (f32 accumulation), median."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / _median_seconds(lambda: f(a, b), iters)


def measure(gb: float = 2.0, n: int = 8192) -> dict:
    torch_bw = copy_bandwidth_torch(gb)
    jax_bw = copy_bandwidth_jax(gb)
    return {"copy_bytes_per_s": max(torch_bw or 0.0, jax_bw), "copy_torch": torch_bw, "copy_jax": jax_bw,
            "matmul_flops": matmul_rate(n)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="GiB copied")
    ap.add_argument("--n", type=int, default=8192, help="matmul size")
    args = ap.parse_args()
    m = measure(args.gb, args.n)
    torch_bw = f"{m['copy_torch'] / 1e12:.2f} TB/s" if m["copy_torch"] else "n/a (no torch/CUDA)"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"device copy: torch {torch_bw}, jnp {m['copy_jax'] / 1e12:.2f} TB/s -> ceiling "
          f"{m['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"bf16 matmul {args.n}^3: {m['matmul_flops'] / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
