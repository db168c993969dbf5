"""Attention kernels at full size on the GPU: correctness against the `jnp` reference, then time beside
peers in the same run (cuDNN through jax.nn.dot_product_attention; JAX's own Pallas kernels).

Two clocks: wall time per call (median of back-to-back jitted calls, host dispatch included) and device
time per call (the sum of the GPU kernels of one call, from a profiler trace). Inside the engine's
jitted step an attention call has no host dispatch of its own, so device time is the figure that counts
there; at tiny sizes (decode, batch 1) the two differ by the ~40 us of Python dispatch.

    python benchmarks/kernels.py [--decode-only | --prefill-only] [--iters 50]

Peers: cuDNN and XLA (jax.nn.dot_product_attention), JAX's own Pallas ops, and tokamax where it imports.
The device has no network: carry tokamax's wheels (`pip download --no-deps -d .whl tokamax einshape
jaxtyping wadler-lindig qwix typeguard==2.13.3 immutabledict tensorboardx annotated-types typing-inspection`,
pydantic and pydantic-core for the device's Python) and run
`pip install -q --no-deps --no-index --target /tmp/tk .whl/*.whl && PYTHONPATH=/tmp/tk python benchmarks/kernels.py`.

Prefill: bf16 causal, 32 query / 8 KV heads, head dim 128; TFLOP/s = 4 * B * S^2 * N * H / 2 / time.

Decode: bf16, 32 query / 8 KV heads, head dim 128, pages of --page-size tokens scattered in the pool.
Figure: GB/s of K/V read (2 * B * ctx * KV * D * 2 bytes), against the device copy rate (~2.9 TB/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_trace import kernel_times

N_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DECODE_SHAPES = [(64, 4096), (8, 32768), (1, 4096)]
PREFILL_SHAPES = [(4, 4096), (1, 16384), (16, 1024)]
# Block sizes tried for the Triton-lowered prefill kernel (block_q, block_k, num_warps, num_stages).
PREFILL_BLOCKS = [(32, 64, 8, 3), (32, 128, 8, 2)]


def timeit(fn, iters: int) -> float:
    """Median seconds per call; each sample runs 5 calls back to back to hide dispatch gaps."""
    jax.block_until_ready(fn())
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(5):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / 5)
    return statistics.median(samples)


def timeit_interleaved(fns: dict, iters: int) -> dict:
    """Like `timeit` for several functions at once, taking their samples in turn, so that drift of the
    GPU's clocks over a run (thermal, power) falls on all of them alike. {name: median seconds}."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(5):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t) / 5)
    return {name: statistics.median(v) for name, v in samples.items()}


def import_tokamax():
    """tokamax, or ImportError where its wheels were not carried. It reads absl flags on first use: mark them
    parsed, or this script's own flags (--iters) are refused as unknown."""
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def device_time_interleaved(fns: dict, rounds: int = 7, iters: int = 3) -> dict:
    """Device time (the summed GPU kernels of one call, from profiler traces), the functions traced in turn
    `rounds` times: {name: median seconds per call}."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(sum(us for _, us in kernel_times(fn, iters=iters)) * 1e-6)
    return {name: statistics.median(v) for name, v in samples.items()}


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def decode_case(B, ctx, page_size, iters, rng):
    from jinfer.attention.pallas import pallas_backend
    from jinfer.kernels.paged_attention.kernel import ragged_paged_attention_triton
    from jinfer.kernels.paged_attention.query_layout import query_blocks
    from jinfer.kernels.paged_attention.reference import ragged_paged_attention_reference

    pages_per_seq = ctx // page_size
    P = B * pages_per_seq + 1
    key = jax.random.key(int(rng.integers(1 << 30)))
    k1, k2, k3 = jax.random.split(key, 3)
    k_pages = jax.random.normal(k1, (1, KV_HEADS, P, page_size, HEAD_DIM), jnp.bfloat16)
    v_pages = jax.random.normal(k2, (1, KV_HEADS, P, page_size, HEAD_DIM), jnp.bfloat16)
    q = jax.random.normal(k3, (B, N_HEADS, HEAD_DIM), jnp.bfloat16)
    page_table = jnp.asarray(rng.permutation(np.arange(1, P))[: B * pages_per_seq].reshape(B, pages_per_seq), jnp.int32)
    kv_len = jnp.full((B,), ctx, jnp.int32)
    qs, ql = np.arange(B, dtype=np.int32), np.ones(B, np.int32)
    layer = jnp.int32(0)

    backend = pallas_backend(KV_HEADS, N_HEADS, B, page_size)
    bs = backend.decode
    nb = backend.num_blocks(B, 1, B)
    blocks, (tb, tr) = query_blocks(qs, ql, bs.block_q, nb, B)
    blocks = tuple(jnp.asarray(x) for x in blocks)
    tb, tr = jnp.asarray(tb), jnp.asarray(tr)
    ours = jax.jit(lambda q, k, v: ragged_paged_attention_triton(
        q, k, v, layer, page_table, kv_len, jnp.asarray(ql), blocks, tb, tr, num_blocks=nb, block_sizes=bs,
        interpret=backend.interpret))
    ref = jax.jit(lambda q, k, v: ragged_paged_attention_reference(
        q, k, v, page_table, kv_len, jnp.asarray(qs), jnp.asarray(ql), max_query_len=1, layer=layer))
    out = ours(q, k_pages, v_pages)
    err = rel_err(out, ref(q, k_pages, v_pages)) if B * ctx <= 64 * 4096 else float("nan")
    if np.isnan(err):  # the reference gathers everything at once: check a slice of the batch instead
        err = rel_err(out[:2], ref(q, k_pages, v_pages)[:2])
    bytes_kv = 2 * B * ctx * KV_HEADS * HEAD_DIM * 2
    rows = [("jinfer pallas", lambda: ours(q, k_pages, v_pages), err)]
    # Peer: cuDNN on a dense [B, ctx] cache (no paging: an easier job).
    kd = jax.random.normal(k1, (B, ctx, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    vd = jax.random.normal(k2, (B, ctx, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn"))
    rows.append(("cuDNN (dense)", lambda: cudnn(q, kd, vd), float("nan")))
    xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="xla"))
    rows.append(("XLA (dense)", lambda: xla(q, kd, vd), float("nan")))
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa

        ppcb = 8 if pages_per_seq % 8 == 0 else 1
        splits = 16 if (pages_per_seq // ppcb) % 16 == 0 else 1
        jp = jax.jit(lambda q, k, v: jpa.paged_attention(q, k, v, page_table, kv_len, pages_per_compute_block=ppcb,
                                                         k_splits=splits))
        rows.append(("JAX pallas paged", lambda: jp(q, k_pages[0], v_pages[0]), float("nan")))
    except Exception as e:
        print(f"  JAX Pallas peer failed: {type(e).__name__}: {str(e)[:120]}")
    try:  # tokamax on the dense cache, one query per row
        tokamax = import_tokamax()
        tk = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q[:, None], k, v))
        jax.block_until_ready(tk(q, kd, vd))
        rows.append(("tokamax (dense)", lambda: tk(q, kd, vd), float("nan")))
    except Exception as e:
        print(f"  tokamax peer failed: {type(e).__name__}: {str(e)[:160]}")
    timed = []
    for name, fn, e in rows:
        try:
            timed.append((name, timeit(fn, iters), sum(us for _, us in kernel_times(fn)) * 1e-6, e))
        except Exception as ex:
            print(f"  {name} failed: {type(ex).__name__}: {str(ex)[:120]}")
    print(f"decode B={B} ctx={ctx} page={page_size} (blocks {bs}):")
    for name, t, dev, e in timed:
        print(f"  {name:<18} wall {t * 1e6:8.1f} us {bytes_kv / t / 1e12:5.2f} TB/s | device {dev * 1e6:8.1f} us "
              f"{bytes_kv / dev / 1e12:5.2f} TB/s" + ("" if np.isnan(e) else f"  rel err {e:.1e}"))
    best_dev = min((dev for _, _, dev, _ in timed[1:]), default=float("nan"))
    print(f"  ratio best peer / jinfer (device time): {best_dev / timed[0][2]:.2f}")


def prefill_case(B, S, iters, rng):
    from jinfer.kernels.flash_attention import flash_attention, flash_attention_reference
    from jinfer.kernels.flash_attention.kernel import BlockSizes

    k1, k2, k3 = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    q = jax.random.normal(k1, (B, S, N_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(k2, (B, S, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(k3, (B, S, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    flops = 4 * B * S * S * N_HEADS * HEAD_DIM / 2
    ours = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True))  # the dispatcher's choice
    fns = {"jinfer (dispatch)": lambda: ours(q, k, v)}
    from jinfer.kernels.flash_attention.tuning import is_hopper

    if is_hopper():  # the two entries of the tuning table, side by side
        from jinfer.kernels.flash_attention.kernel_hopper import flash_attention_hopper
        from jinfer.kernels.flash_attention.tuning import hopper_block_sizes

        for name, keys in (("short", 4096), ("long", 16384)):
            hb = hopper_block_sizes(keys, return_lse=False)
            h = jax.jit(lambda q, k, v, hb=hb: flash_attention_hopper(q, k, v, causal=True, sm_scale=HEAD_DIM ** -0.5,
                                                                    block_sizes=hb))
            fns[f"jinfer hopper {name}-seq entry"] = lambda h=h: h(q, k, v)
    for bq, bk, w, st in PREFILL_BLOCKS:
        bs = BlockSizes(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        f = jax.jit(lambda q, k, v, bs=bs: flash_attention(q, k, v, causal=True, block_sizes=bs))
        fns[f"jinfer triton {bq}x{bk} w{w} s{st}"] = lambda f=f: f(q, k, v)
    n_ours = len(fns)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    fns["cuDNN"] = lambda: cudnn(q, k, v)
    for impl in ("mosaic", "triton"):  # tokamax, where its wheels were carried (see module docstring)
        try:
            tokamax = import_tokamax()
            tk = jax.jit(lambda q, k, v, impl=impl: tokamax.dot_product_attention(q, k, v, is_causal=True,
                                                                                   implementation=impl))
            jax.block_until_ready(tk(q, k, v))
            fns[f"tokamax {impl}"] = lambda tk=tk: tk(q, k, v)
        except Exception as e:
            print(f"  tokamax {impl} peer failed: {type(e).__name__}: {str(e)[:160]}")
    try:
        from jax.experimental.pallas.ops.gpu import attention as jfa

        jf = jax.jit(lambda q, k, v: jfa.mha(q, jnp.repeat(k, N_HEADS // KV_HEADS, 2),
                                             jnp.repeat(v, N_HEADS // KV_HEADS, 2), None, causal=True))
        jax.block_until_ready(jf(q, k, v))
        fns["JAX pallas triton mha"] = lambda: jf(q, k, v)
    except Exception as e:
        print(f"  JAX Pallas peer failed: {type(e).__name__}: {str(e)[:120]}")
    times = timeit_interleaved(fns, iters)
    rows = list(times.items())[:n_ours]
    peers = list(times.items())[n_ours:]
    t_ours = rows[0][1]
    # Correctness: against the jnp reference on the last 512 queries of row 0 (the full reference would
    # hold B x N x S^2 scores), and against cuDNN on everything.
    tail = slice(S - 512, S)
    ref = flash_attention_reference(q[:1, tail], k[:1], v[:1], causal=True, q_offset=jnp.array([S - 512]))
    out = ours(q, k, v)
    err = rel_err(out[:1, tail], ref)
    err_cudnn = rel_err(out, cudnn(q, k, v))
    print(f"prefill causal B={B} S={S} (rel err vs reference {err:.1e}, vs cuDNN {err_cudnn:.1e}):")
    for name, t in rows + peers:
        print(f"  {name:<28} {t * 1e3:8.3f} ms  {flops / t / 1e12:6.1f} TFLOP/s")
    best_peer = min((t for _, t in peers), default=float("nan"))
    print(f"  ratio best peer / jinfer: {best_peer / t_ours:.2f}")
    # The same comparison by device time, traced in turn (host dispatch and clock drift out of the figure).
    traced = ["jinfer (dispatch)", "cuDNN"] + [n for n in fns if n.startswith("tokamax")]
    dev = device_time_interleaved({n: fns[n] for n in traced})
    best = min(dev[n] for n in traced[1:])
    print("  device time: " + ", ".join(f"{n} {t * 1e3:.3f} ms {flops / t / 1e12:.0f} TFLOP/s" for n, t in dev.items())
          + f"; ratio best peer / jinfer {best / dev['jinfer (dispatch)']:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--prefill-only", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(0)
    if not args.decode_only:
        for B, S in PREFILL_SHAPES:
            prefill_case(B, S, args.iters, rng)
    if args.prefill_only:
        return
    for B, ctx in DECODE_SHAPES:
        decode_case(B, ctx, args.page_size, args.iters, rng)


if __name__ == "__main__":
    main()
