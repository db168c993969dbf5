"""Weight-only quantized matmul on the GPU at Llama-3.1-8B's decode shapes: the Pallas kernel
(`jinfer.kernels.quant_matmul`) beside XLA's `x @ dequantize(w)` and a plain bf16 `x @ w`, by device time.

    python benchmarks/quant_matmul.py [--formats int8,int4,fp8] [--m 1,16,64,256] [--shapes 4096x4096,...]
    python benchmarks/quant_matmul.py --sweep [same filters]   # block sizes per shape, best first
    python benchmarks/quant_matmul.py --variants [same filters] [--budget-s 150]  # curated sizes, both paths
    python benchmarks/quant_matmul.py --dry-run [--sweep | --variants]  # tiny shapes, interpret mode: a CPU

Weights: (K, N) in (4096, 4096) wq/wo, (4096, 1024) wk/wv, (4096, 14336) w_gate/w_up, (14336, 4096) w_down,
random normal, quantized by jinfer's RTN (`jinfer.quant.rtn.quantize`): int8 per output channel, int4 in groups
of 128 (asymmetric), fp8 per output channel; x [M, K] bf16, fresh random. "bytes" is what a call must read at
least: the stored weight (values, scales, offsets) plus x and the output; GB/s = bytes / device time, and
"of copy" is that against a device copy measured in the same run (read + write bytes of a ~2 GB array, the
better of `jnp.copy` and an elementwise op). Device time is the sum of the GPU kernels of one call from a
profiler trace (benchmarks/gpu_trace.py), split-K's reduction included; the median of --rounds traces, the
implementations taken in turn. Errors: max |out - reference| and that over max |reference|, against
`quantized_matmul_reference` (float32 products).

--variants times a curated list of block sizes of both kernel paths per (shape, M, format), the kernel's
default among them (int4 and int8 also stored "out_in", the outputs-first layout of `out_in.py`), against weights rotated over enough stacked layers (> 3x the L2) that no call finds its
weight in the cache; all variants of a case in one profiler trace per round (the kernel's name carries its
sizes; a split-K sum is charged to the kernel before it). It prints each variant's time and fraction of copy,
the best, and a TABLE line; cases run in the order given until --budget-s seconds have passed.

--sweep times a grid of block sizes per (shape, M, format) in two passes (tiles and split first, then warps
and stages for the best tile) and prints the best beside the tuned default, as entries for
`jinfer.kernels.quant_matmul.tuning.TABLE`. Each size is a compilation (a second or two on the GPU) and up to
~80 sizes per case: sweep a few cases per command (`--formats int4 --m 1`) to stay inside 10 minutes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_trace import gpu_kernels, kernel_times
from jinfer.kernels.quant_matmul import quantized_matmul, quantized_matmul_reference
from jinfer.kernels.quant_matmul.kernel import kernel_name
from jinfer.kernels.quant_matmul.out_in import kernel_name as out_in_kernel_name
from jinfer.kernels.quant_matmul.out_in import split_plan
from jinfer.kernels.quant_matmul.tuning import QuantMatmulBlockSizes, block_sizes_for, fit_block_sizes, m_bucket
from jinfer.quant.qtensor import QTensor, dequantize, to_out_in
from jinfer.quant.rtn import quantize

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
MS = [1, 16, 64, 256]
GROUP = {"int8": 0, "int4": 128, "fp8": 0}
DRY_SHAPES, DRY_MS = [(576, 192), (256, 320)], [1, 17]


def wall_time(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def device_time(fns: dict, rounds: int, iters: int) -> tuple[dict, str]:
    """{name: median seconds per call} and the clock: on a GPU the sum of its kernels from profiler traces, the
    functions traced in turn (a call that shows no kernel falls back to wall time); elsewhere wall time."""
    gpu = jax.devices()[0].platform == "gpu"
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            us = sum(t for _, t in kernel_times(fn, iters=iters)) if gpu else 0.0
            samples[name].append(us * 1e-6 if us else wall_time(fn, iters))
    return {name: statistics.median(v) for name, v in samples.items()}, "device" if gpu else "wall"


def copy_bandwidth(nbytes: int, rounds: int) -> float:
    """Bytes per second of a device copy (read + write), the better of jnp.copy and an elementwise op."""
    a = jnp.ones((nbytes // 2,), jnp.bfloat16)
    fns = {"copy": jax.jit(jnp.copy), "x+1": jax.jit(lambda a: a + 1)}
    times, _ = device_time({k: (lambda f=f: f(a)) for k, f in fns.items()}, rounds, iters=5)
    return 2 * a.nbytes / min(times.values())


def make_weight(K: int, N: int, fmt: str, seed: int) -> tuple[QTensor, jax.Array]:
    w = jax.random.normal(jax.random.key(seed), (K, N), jnp.float32) * 0.02
    return quantize(w, fmt=fmt, n_in=1, group_size=GROUP[fmt]), w.astype(jnp.bfloat16)


def weight_bytes(w: QTensor) -> int:
    return sum(a.nbytes for a in (w.values, w.scale, w.offset) if a is not None)


def errors(out, ref) -> tuple[float, float]:
    d = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    return d, d / float(jnp.max(jnp.abs(ref.astype(jnp.float32))))


def run_shape(K, N, M, fmt, args, copy_bps, interpret):
    w, wb = make_weight(K, N, fmt, seed=K * 7 + N + M)
    x = jax.random.normal(jax.random.key(M + K), (M, K), jnp.bfloat16)
    io = x.nbytes + M * N * 2
    ours = jax.jit(lambda x, w: quantized_matmul(x, w, interpret=interpret))
    xla = jax.jit(lambda x, w: x @ dequantize(w, x.dtype))
    dense = jax.jit(lambda x, w: x @ w)
    times, clock = device_time({"ours": lambda: ours(x, w), "xla": lambda: xla(x, w), "bf16": lambda: dense(x, wb)},
                               args.rounds, args.iters)
    ref = quantized_matmul_reference(x, w.values, w.scale, w.offset, fmt=fmt, group_size=w.group_size)
    abs_e, rel_e = errors(ours(x, w), ref)
    xla_e = errors(xla(x, w), ref)[1]
    qbytes, bbytes = weight_bytes(w) + io, wb.nbytes + io
    bs = block_sizes_for(M, K, N, fmt, jax.devices()[0].device_kind, w.group_size)

    def rate(nbytes, t):
        return f"{t * 1e6:8.1f} us {nbytes / t / 1e9:7.0f} GB/s {nbytes / t / copy_bps:5.2f}"

    print(f"K={K:5d} N={N:5d} M={M:3d} {fmt:4s} {qbytes / 1e6:7.1f} MB | ours {rate(qbytes, times['ours'])} | "
          f"xla {rate(qbytes, times['xla'])} | bf16 {bbytes / 1e6:6.1f} MB {rate(bbytes, times['bf16'])} | "
          f"xla/ours {times['xla'] / times['ours']:4.2f} bf16/ours {times['bf16'] / times['ours']:4.2f} | "
          f"err {abs_e:.1e} abs {rel_e:.1e} rel (xla {xla_e:.1e}) | {clock} | bm{bs.block_m} bn{bs.block_n} bk{bs.block_k} "
          f"w{bs.num_warps} s{bs.num_stages} split{bs.split_k}", flush=True)


def sweep_grid(M, K, fmt, group, dry):
    """Pass 1 candidates: (block_m, block_n, block_k, split_k) at 4 warps, 3 stages."""
    bms = [16] if M <= 16 else [b for b in (16, 32, 64, 128) if b <= max(16, 1 << (M - 1).bit_length())]
    bns = [64, 128] if dry else [32, 64, 128, 256]
    bks = [64, 128] if dry else [32, 64, 128, 256]
    splits = [1, 2] if dry else [1, 2, 4, 8]
    for bm, bn, bk, sp in itertools.product(bms, bns, bks, splits):
        if (fmt == "int4" and bn < 32) or (group and group % bk) or sp * bk * 2 > K:
            continue
        yield QuantMatmulBlockSizes(block_m=bm, block_n=bn, block_k=bk, num_warps=4, num_stages=3, split_k=sp)


def time_sizes(x, w, bs, interpret, iters):
    f = jax.jit(lambda x, w: quantized_matmul(x, w, block_sizes=bs, interpret=interpret))
    try:
        jax.block_until_ready(f(x, w))
    except Exception as e:  # a size the compiler refuses (e.g. shared memory): skipped, reported
        return float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    t, _ = device_time({"f": lambda: f(x, w)}, rounds=1, iters=iters)
    return t["f"], None


def sweep_shape(K, N, M, fmt, args, interpret):
    w, _ = make_weight(K, N, fmt, seed=K + N)
    x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
    kind = jax.devices()[0].device_kind
    default = block_sizes_for(M, K, N, fmt, kind, w.group_size)
    results = {}
    for bs in sweep_grid(M, K, fmt, w.group_size, args.dry_run):
        results[bs], err = time_sizes(x, w, bs, interpret, args.iters)
        if err:
            print(f"  skipped {bs}: {err}")
    best = min(results, key=results.get)
    stages = [(4, 2), (4, 4), (8, 3)] if args.dry_run else [(w_, s) for w_ in (2, 4, 8) for s in (2, 3, 4, 5)]
    for warps, st in stages:
        bs = dataclasses.replace(best, num_warps=warps, num_stages=st)
        if bs not in results:
            results[bs], _ = time_sizes(x, w, bs, interpret, args.iters)
    if default not in results:
        results[default], _ = time_sizes(x, w, default, interpret, args.iters)
    ranked = sorted(results, key=results.get)
    nbytes = weight_bytes(w) + x.nbytes + M * N * 2
    print(f"K={K} N={N} M={M} {fmt}: {len(results)} sizes; default {results[default] * 1e6:.1f} us")
    for bs in ranked[:3]:
        print(f"  {results[bs] * 1e6:8.1f} us {nbytes / results[bs] / 1e9:6.0f} GB/s  {bs}")
    b = ranked[0]
    print(f"  TABLE[({kind!r}, {fmt!r}, {m_bucket(M)})] = QuantMatmulBlockSizes(block_m={b.block_m}, "
          f"block_n={b.block_n}, block_k={b.block_k}, num_warps={b.num_warps}, num_stages={b.num_stages}, "
          f"path={b.path!r})  # split_k {b.split_k} at this shape; default's {default.split_k}", flush=True)


def _fma(bn, bk, unroll, warps, split=1, prefetch=True, **kw):
    return QuantMatmulBlockSizes(block_n=bn, block_k=bk, unroll=unroll, num_warps=warps, num_stages=1, path="fma",
                                 split_k=split, prefetch=prefetch, **kw)


def _mma(bm, bn, bk, warps, stages, split=1):
    return QuantMatmulBlockSizes(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                 split_k=split)


def variant_list(M: int, fmt: str) -> list[QuantMatmulBlockSizes]:
    """Curated candidates: split_k 1 is left to fit_block_sizes, another is kept. The "fma" ones keep a thread's
    share of a step to 32-64 weights (its accumulators) so that 16-32 warps fit on a multiprocessor."""
    if M == 1 and fmt == "int4":  # the nibbles unpacked by PTX or by jnp; group sums or prescaled weights
        return [_fma(256, 32, 1, 4, prefetch=False, ptx=False), _fma(256, 32, 1, 4, prefetch=False, prescale=True),
                _fma(128, 32, 1, 4, prefetch=False, prescale=True), _fma(256, 64, 1, 4, prefetch=False, prescale=True),
                _fma(256, 16, 1, 4, prefetch=False, prescale=True), _fma(128, 32, 1, 4), _fma(256, 32, 1, 8, 20),
                _fma(128, 32, 1, 2, 10, prefetch=False)]
    if M == 1:
        return [_fma(128, 32, 4, 4), _fma(128, 32, 4, 4, 16), _fma(128, 64, 2, 4, 16), _fma(256, 32, 2, 4, 20),
                _fma(64, 64, 2, 2, 16), _fma(128, 64, 2, 2, 5, prefetch=False), _fma(128, 64, 2, 2, 10, prefetch=False)]
    if M <= 8:
        return [_mma(16, 256 if fmt == "int4" else 128, 128, 4, 4), _mma(16, 128, 64, 4, 5, 8),
                _fma(128, 16, 4, 4, 16), _fma(256, 32, 1, 4, prefetch=False), _fma(128, 32, 1, 4, prefetch=False)]
    if M <= 16:
        if fmt == "int4":
            return [_mma(16, 256, 128, 4, 4), _mma(16, 256, 128, 4, 4, 10), _mma(16, 128, 128, 4, 4, 10),
                    _mma(16, 128, 64, 4, 5, 16)]
        return [_mma(16, 128, 64, 4, 5), _mma(16, 128, 64, 4, 5, 8), _mma(16, 64, 64, 4, 5, 8),
                _mma(16, 128, 64, 4, 5, 16)]
    return [_mma(64, 128, 128, 4, 3), _mma(64, 128, 64, 4, 4, 6)]


def pallas_kernel_times(calls: list, names: list, iters: int, details: dict | None = None) -> dict:
    """{name: microseconds per call} of several functions traced in turn in one profiler trace: each Pallas
    kernel (named quantized_matmul_...) is charged to the call whose name its kernel bears, and any other kernel
    (split-K's sum) to the Pallas kernel before it on the device. `details` gets each name's launch details as
    the trace reports them (registers a thread, occupancy)."""
    def run():
        for fn in calls:
            for i in range(iters):
                out = fn(i)
            jax.block_until_ready(out)

    total, owner = collections.Counter(), None
    for e in gpu_kernels(run):
        if e["name"].startswith("quantized_matmul_"):
            owner = next((n for n in names if e["name"] == n), None) or next(
                (n for n in names if e["name"].startswith(n + "_") or n.startswith(e["name"])), e["name"])
        if owner is not None:
            total[owner] += e.get("dur", 0)
            if details is not None and e["name"].startswith("quantized_matmul_"):
                details[owner] = e.get("args", {}).get("kernel_details", "")
    return {n: total[n] / iters for n in names}


def split_count(bs: QuantMatmulBlockSizes, K: int, group: int) -> int:
    """How many K splits the wrapper makes of these sizes (as `quantized_matmul_triton` counts them)."""
    units = -(-K // (bs.block_k * ((group // bs.block_k if group else bs.unroll) if bs.path == "fma" else 1)))
    per = -(-units // min(bs.split_k, units))
    return -(-units // per)


def out_in_variant_list(M: int, fmt: str) -> list[QuantMatmulBlockSizes]:
    """Weights stored out_in (`out_in.py`): the table's choice and its neighbours in the sm_90 machine code
    (`sass_profile.py quant --layout out_in`): wider tiles amortize x's per-step work, more stages keep more
    loads in flight."""
    bm = 16 if M <= 16 else 64
    if fmt == "int8":
        return [_mma(bm, 128, 128, 4, 3), _mma(bm, 128, 128, 4, 4), _mma(bm, 128, 64, 4, 5), _mma(bm, 256, 64, 8, 4),
                _mma(bm, 64, 128, 4, 4)]
    return [_mma(bm, 128, 128, 4, 4), _mma(bm, 256, 128, 8, 4), _mma(bm, 256, 128, 4, 4), _mma(bm, 128, 64, 4, 6),
            _mma(bm, 128, 128, 4, 3), _mma(bm, 128, 128, 8, 4)]


def variant_kernel_name(fmt: str, bs: QuantMatmulBlockSizes, layout: str, K: int, group: int) -> str:
    if layout == "out_in":
        return out_in_kernel_name(fmt, bs, split_plan(K, bs)[2])
    return kernel_name(fmt, bs, split_count(bs, K, group))


def variants_case(K, N, M, fmt, args, copy_bps, interpret, log):
    kind = jax.devices()[0].device_kind
    probe, _ = make_weight(K, N, fmt, seed=0)
    layers = max(2, min(8, int(3 * 50e6 / weight_bytes(probe)) + 1))  # > 3x a 50 MB L2
    del probe
    wl = jax.random.normal(jax.random.key(K + N), (layers, K, N), jnp.float32) * 0.02
    w = quantize(wl, fmt=fmt, n_in=1, group_size=GROUP[fmt], lead=1)
    del wl
    lids = [jnp.int32(i) for i in range(layers)]
    x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
    nbytes = weight_bytes(w) // layers + x.nbytes + M * N * 2
    default = block_sizes_for(M, K, N, fmt, kind, w.group_size)

    def fitted(v):
        bs = fit_block_sizes(v, M, K, N, kind, w.group_size)
        return dataclasses.replace(bs, split_k=v.split_k) if v.split_k > 1 else bs

    # (block sizes, int4 layout): the importers' layout, and for int4 the kernel on weights stored out_in
    cands = [(default, "in_out")] + [(c, "in_out") for c in map(fitted, variant_list(M, fmt)) if c != default]
    stored = {"in_out": w}
    if fmt in ("int4", "int8"):
        stored["out_in"] = to_out_in(w)
        cands += [(fitted(v), "out_in") for v in out_in_variant_list(M, fmt)]
    w0 = jax.tree.map(lambda a: a[0], w)
    ref = quantized_matmul_reference(x, w0.values, w0.scale, w0.offset, fmt=fmt, group_size=w.group_size)
    fns, names, errs = [], [], {}
    for bs, layout in cands:
        f = jax.jit(lambda x, w, l, bs=bs: quantized_matmul(x, w, layer=l, block_sizes=bs, interpret=interpret))
        wl = stored[layout]
        try:
            out = jax.block_until_ready(f(x, wl, lids[0]))
        except Exception as e:  # a size the compiler refuses (e.g. shared memory): skipped, reported
            log(f"  skipped {layout} {bs}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        errs[bs, layout] = errors(out, ref)[1]
        fns.append(lambda i, f=f, wl=wl: f(x, wl, lids[i % layers]))
        names.append((bs, layout))
    if not fns:
        return None
    samples, launch = collections.defaultdict(list), {}
    for _ in range(args.rounds):
        prefixes = [variant_kernel_name(fmt, bs, layout, K, w.group_size) for bs, layout in names]
        if jax.devices()[0].platform == "gpu":
            got = pallas_kernel_times(fns, prefixes, args.iters, launch)
        else:  # no device trace: wall time
            got = {p: wall_time(lambda fn=fn: fn(0), args.iters) * 1e6 for p, fn in zip(prefixes, fns)}
        for bs, p in zip(names, prefixes):
            samples[bs].append(got[p])
    times = {bs: statistics.median(v) * 1e-6 for bs, v in samples.items() if min(v) > 0}
    ranked = sorted(times, key=times.get)
    xla = jax.jit(lambda x, w: x @ dequantize(w, x.dtype))  # one layer, apart (a slice would copy it)
    peers = {"xla": lambda i: xla(x, w0)}
    if M <= 16:
        wd = jax.random.normal(jax.random.key(1), (K, N), jnp.bfloat16)
        dense = jax.jit(lambda x, w: x @ w)
        peers["bf16"] = lambda i: dense(x, wd)
    peer_t = {}
    for name, fn in peers.items():
        jax.block_until_ready(fn(0))
        peer_t[name], _ = device_time({name: lambda fn=fn: fn(0)}, 1, args.iters)
    peer_line = "  ".join(f"{n} {t[n] * 1e6:.1f} us" for n, t in peer_t.items())
    log(f"K={K} N={N} M={M} {fmt}: {nbytes / 1e6:.1f} MB over {layers} layers; default "
        f"{times.get((default, 'in_out'), 0) * 1e6:.1f} us; {peer_line}")
    for bs, layout in ranked:
        t = times[bs, layout]
        tag = " (default)" if (bs, layout) == (default, "in_out") else ""
        log(f"  {t * 1e6:7.1f} us {nbytes / t / 1e9:6.0f} GB/s {nbytes / t / copy_bps:5.2f} of copy  "
            f"err {errs[bs, layout]:.1e}  {layout} {bs.path} bm{bs.block_m} bn{bs.block_n} bk{bs.block_k} "
            f"u{bs.unroll} w{bs.num_warps} s{bs.num_stages} split{bs.split_k} prefetch={int(bs.prefetch)} "
            f"ptx={int(bs.ptx)} prescale={bs.prescale}{tag}  "
            f"{launch.get(variant_kernel_name(fmt, bs, layout, K, w.group_size), '')}")
    b, layout = ranked[0]
    if layout == "out_in":
        log(f"  fastest stored out_in: OUT_IN_TABLE[({kind!r}, {fmt!r}, {m_bucket(M)})] = {b}  # and OUT_IN_FORMATS")
    log(f"  TABLE[({kind!r}, {fmt!r}, {m_bucket(M)})] = QuantMatmulBlockSizes(block_m={b.block_m}, block_n={b.block_n}, "
        f"block_k={b.block_k}, num_warps={b.num_warps}, num_stages={b.num_stages}, path={b.path!r}, unroll={b.unroll}, "
        f"prescale={b.prescale}, ptx={b.ptx})  # split_k {b.split_k} here")
    return b, layout, times[b, layout], nbytes, {n: t[n] for n, t in peer_t.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int8,int4,fp8")
    ap.add_argument("--m", default=None, help="comma-separated M values")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--copy-gb", type=float, default=2.0)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--cases", default=None, help="KxN:M:fmt,... in this order (instead of the filters' product)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="--variants: start no case after this many seconds")
    ap.add_argument("--log", default=None, help="also append the output to this file")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes in interpret mode (for a CPU)")
    args = ap.parse_args()
    dry = args.dry_run
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else DRY_SHAPES if dry else SHAPES)
    ms = [int(v) for v in args.m.split(",")] if args.m else DRY_MS if dry else MS
    formats = args.formats.split(",")
    if dry:
        args.rounds, args.iters = min(args.rounds, 1), min(args.iters, 2)
    interpret = dry or jax.devices()[0].platform != "gpu"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}{' (dry run: interpret mode)' if dry else ''}")
    cases = list(itertools.product(shapes, ms, formats))
    if args.cases:
        cases = [(tuple(int(v) for v in kn.split("x")), int(m), f)
                 for kn, m, f in (c.split(":") for c in args.cases.split(","))]
    if args.sweep:
        for (K, N), M, fmt in cases:
            sweep_shape(K, N, M, fmt, args, interpret)
        return
    if args.variants:
        start = time.perf_counter()

        def log(line):
            print(line, flush=True)
            if args.log:
                with open(args.log, "a") as fh:
                    fh.write(line + "\n")

        copy_bps = copy_bandwidth(int((0.004 if dry else args.copy_gb) * 1e9), args.rounds)
        log(f"device copy: {copy_bps / 1e9:.0f} GB/s")
        summary = []
        for (K, N), M, fmt in cases:
            if time.perf_counter() - start > args.budget_s:
                log(f"budget spent: skipped K={K} N={N} M={M} {fmt} and after")
                break
            best = variants_case(K, N, M, fmt, args, copy_bps, interpret, log)
            if best:
                b, layout, t, nbytes, peer = best
                dense = f", bf16 {peer['bf16'] * 1e6:.1f} us" if "bf16" in peer else ""
                log(f"BEST {K}x{N} M={M} {fmt} {t * 1e6:.1f} us {nbytes / t / copy_bps:.2f} of copy, "
                    f"xla {peer['xla'] * 1e6:.1f} us{dense}")
                summary.append(f"{K}x{N} M={M:3d} {fmt:4s} {t * 1e6:7.1f} us {nbytes / t / copy_bps:5.2f} of copy "
                               f"xla/ours {peer['xla'] / t:4.2f} "
                               f"{layout} {b.path} bm{b.block_m} bn{b.block_n} bk{b.block_k} u{b.unroll} w{b.num_warps} "
                               f"s{b.num_stages} split{b.split_k}")
        log("best per case:")
        for line in summary:
            log("  " + line)
        return
    copy_bps = copy_bandwidth(int((0.004 if dry else args.copy_gb) * 1e9), args.rounds)
    print(f"device copy: {copy_bps / 1e9:.0f} GB/s (read + write); columns: time, GB/s, fraction of copy")
    for (K, N), M, fmt in cases:
        run_shape(K, N, M, fmt, args, copy_bps, interpret)


if __name__ == "__main__":
    main()
