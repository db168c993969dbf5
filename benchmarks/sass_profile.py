"""Offline machine code of jinfer's Pallas Triton kernels for the H100 / H200 (sm_90), without a GPU.

The GPU kernels are bound by instruction issue and latency as much as by bytes (RESULTS.md, sessions 27-31),
and a lent GPU is scarce. This lowers a kernel as the engine calls it (jax's Triton lowering, which needs no
GPU), compiles the Triton IR for sm_90 with the `triton` package's compiler and the ptxas it ships, and
prints what decides the kernel's speed before any device time is spent: registers a thread (occupancy),
shared memory, and the main loop's instructions by opcode, per weight or per K/V element a thread handles.

    pip install --no-deps --target /tmp/tritonsite triton==3.6.0   # the Triton of the lent GPU
    python benchmarks/sass_profile.py quant --fmt int4 --m 1 --k 4096 --n 14336 [--bs "block_n=256,prescale=False"]
    python benchmarks/sass_profile.py quant --layout out_in [--m 16]     # int4 stored outputs-first
    python benchmarks/sass_profile.py decode --batch 64 --context 4096 [--bs "num_stages=2"]

Caveats: XLA compiles the same Triton IR with its own bundled Triton, which may differ from the wheel's in
small ways; counts are static (a loop's body, not its trip count); and only a timed run on the device says
what a count is worth. Use it to screen variants, then time the survivors (`quant_matmul.py --variants`,
`decode_tune.py`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SM90 = ("cuda", 90, 32)


@dataclasses.dataclass(frozen=True)
class TritonModule:
    name: str
    ttir: str  # the Triton IR jax hands to XLA
    num_warps: int
    num_stages: int


def capture_triton(fn, *args) -> list[TritonModule]:
    """Lowers jit(fn)(*args) for CUDA on this (GPU-less) machine and returns each Pallas kernel's Triton IR
    with its launch options, taken from jax's Triton lowering as it builds them."""
    from jax._src.pallas.triton import pallas_call_registration as reg  # noqa: PLC2701 - no public API gives the Triton IR

    found: list[TritonModule] = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        result = lower(*a, **k)
        caller = sys._getframe(1).f_locals  # pallas_call_lowering's locals: its resolved launch options
        module = result.module.operation
        found.append(TritonModule(str(module.attributes["sym_name"]).strip('"'),
                                  module.get_asm(enable_debug_info=False),
                                  int(caller["num_warps"]), int(caller["num_stages"])))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = spy
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = lower
    return found


@dataclasses.dataclass(frozen=True)
class Sass:
    registers: int
    shared_bytes: int
    local_bytes: int  # spills
    lines: list[str]

    def opcode(self, line: str) -> str | None:
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        return m and m.group(1)

    def loops(self) -> list[collections.Counter]:
        """Each backward branch's body (label to branch) as opcode counts, largest first."""
        labels = {m.group(1): i for i, line in enumerate(self.lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
        bodies = []
        for i, line in enumerate(self.lines):
            m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
            if m and labels.get(m.group(1), i) < i:
                bodies.append(collections.Counter(op for op in map(self.opcode, self.lines[labels[m.group(1)]:i + 1])
                                                  if op))
        return sorted(bodies, key=lambda c: -sum(c.values()))


def compile_sm90(module: TritonModule) -> Sass:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        sys.exit(f"needs the triton package ({e}); see this script's docstring")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, f"{module.name}.ttir")
        with open(src, "w") as f:
            f.write(module.ttir)
        kernel = triton.compile(src, target=GPUTarget(*SM90),
                                options=dict(num_warps=module.num_warps, num_stages=module.num_stages))
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    # Triton's pipeline buffers are dynamic shared memory, which the cubin's static count leaves out.
    shared = max(field("SHARED"), int(kernel.metadata.shared))
    return Sass(field("REG"), shared, field("LOCAL"), sass.splitlines())


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> float:
    """Resident warps over the 64 an sm_90 multiprocessor holds (65536 registers, allocated per warp in units
    of 256; 228 KB shared memory, 1 KB reserved per block)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(65536 // (per_warp * num_warps), 32, (228 * 1024) // (shared_bytes + 1024))
    return min(64, blocks * num_warps) / 64


def report(module: TritonModule, units_per_iteration: float | None, unit: str) -> None:
    sass = compile_sm90(module)
    occ = occupancy(sass.registers, sass.shared_bytes, module.num_warps)
    print(f"{module.name}: {module.num_warps} warps, {module.num_stages} stages; {sass.registers} registers a thread, "
          f"{sass.shared_bytes} B shared, {sass.local_bytes} B spilled; occupancy {occ:.1%}")
    loops = sass.loops()
    if not loops:
        print("  no loop")
        return
    for rank, body in enumerate(loops[:2]):  # a kernel may run two loops (e.g. unmasked steps, then masked)
        n = sum(body.values())
        if rank and n < 64:
            break
        per = f", {n / units_per_iteration:.2f} a {unit}" if units_per_iteration else ""
        print(f"  {('main', 'second')[rank]} loop: {n} instructions{per} ({units_per_iteration or '?'} {unit}s a "
              f"thread an iteration)")
        print("   ", " ".join(f"{op}:{c}" for op, c in body.most_common()))


def parse_sizes(text: str) -> dict:
    """'block_n=256,prescale=False' -> {'block_n': 256, 'prescale': False}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key.strip()] = {"True": True, "False": False, "None": None}.get(value.strip(), None) \
            if value.strip() in ("True", "False", "None") else (int(value) if value.strip().isdigit()
                                                                 else value.strip().strip("'\""))
    return out


def quant_case(a) -> None:
    from jinfer.kernels.quant_matmul import quantized_matmul
    from jinfer.kernels.quant_matmul.tuning import block_sizes_for
    from jinfer.quant.qtensor import to_out_in
    from jinfer.quant.rtn import quantize

    group = a.group if a.fmt == "int4" else 0
    out_in = a.layout == "out_in"
    w = jax.eval_shape(lambda: (to_out_in if out_in else lambda q: q)(quantize(
        jnp.zeros((4, a.k, a.n), jnp.bfloat16), fmt=a.fmt, n_in=1, group_size=group, lead=1)))
    bs = dataclasses.replace(block_sizes_for(a.m, a.k, a.n, a.fmt, a.device_kind, group, a.layout),
                             **parse_sizes(a.bs))
    print(f"{a.fmt} ({a.layout}) M={a.m} K={a.k} N={a.n}: {bs}")
    [module] = capture_triton(lambda x, w, layer: quantized_matmul(x, w, layer=layer, block_sizes=bs,
                                                                   interpret=False),
                              jax.ShapeDtypeStruct((a.m, a.k), jnp.bfloat16), w, jax.ShapeDtypeStruct((), jnp.int32))
    threads = 32 * bs.num_warps
    if bs.path == "fma" and not out_in:
        k_per_iter = group if group else bs.block_k * bs.unroll
    else:
        k_per_iter = bs.block_k
    report(module, k_per_iter * bs.block_n / threads, "weight")


def decode_case(a) -> None:
    from benchmarks.kernels import HEAD_DIM, KV_HEADS, N_HEADS
    from jinfer.kernels.paged_attention import kernel as pk
    from jinfer.kernels.paged_attention.query_layout import query_blocks
    from jinfer.kernels.paged_attention.tuning import gpu_block_sizes

    decode, _ = gpu_block_sizes(KV_HEADS, N_HEADS, a.batch, a.page_size, a.device_kind)
    bs = dataclasses.replace(decode, **parse_sizes(a.bs))
    print(f"paged decode B={a.batch} context={a.context} pages of {a.page_size}: {bs}")
    pages = a.context // a.page_size
    kp = jax.ShapeDtypeStruct((1, KV_HEADS, a.batch * pages + 1, a.page_size, HEAD_DIM), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((a.batch, N_HEADS, HEAD_DIM), jnp.bfloat16)
    pt, kv_len = jax.ShapeDtypeStruct((a.batch, pages), jnp.int32), jax.ShapeDtypeStruct((a.batch,), jnp.int32)
    blocks, (tb, tr) = query_blocks(np.arange(a.batch, dtype=np.int32), np.ones(a.batch, np.int32), bs.block_q,
                                    a.batch, a.batch)
    meta = (jax.ShapeDtypeStruct((), jnp.int32), pt, kv_len, jax.ShapeDtypeStruct((a.batch,), jnp.int32),
            tuple(jax.ShapeDtypeStruct(x.shape, jnp.int32) for x in blocks),
            jax.ShapeDtypeStruct(tb.shape, jnp.int32), jax.ShapeDtypeStruct(tr.shape, jnp.int32))
    modules = capture_triton(lambda q, k, v, meta: pk.ragged_paged_attention_triton(
        q, k, v, *meta, num_blocks=a.batch, block_sizes=bs, interpret=False), q, kp, kp, meta)
    keys = bs.pages_per_block * a.page_size
    report(modules[0], 2 * keys * HEAD_DIM / (32 * bs.num_warps), "K/V element")
    for extra in modules[1:]:  # the split combine
        report(extra, None, "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="case", required=True)
    q = sub.add_parser("quant", help="the quantized matmul (jinfer.kernels.quant_matmul)")
    q.add_argument("--fmt", default="int4", choices=("int8", "int4", "fp8"))
    q.add_argument("--m", type=int, default=1)
    q.add_argument("--k", type=int, default=4096)
    q.add_argument("--n", type=int, default=14336)
    q.add_argument("--group", type=int, default=128, help="int4's group size")
    q.add_argument("--layout", default="in_out", choices=("in_out", "out_in"), help="int4 / int8's stored layout")
    d = sub.add_parser("decode", help="the paged decode attention (jinfer.kernels.paged_attention)")
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--context", type=int, default=4096)
    d.add_argument("--page-size", type=int, default=16)
    for p in (q, d):
        p.add_argument("--bs", default="", help="block-size fields to override, e.g. 'num_warps=8,num_stages=2'")
        p.add_argument("--device-kind", default="NVIDIA H200", help="whose tuning table entry to start from")
    a = ap.parse_args()
    (quant_case if a.case == "quant" else decode_case)(a)


if __name__ == "__main__":
    main()
