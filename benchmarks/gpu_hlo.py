"""The engine's decode step compiled for an NVIDIA H200 on a machine without a GPU: XLA's optimized HLO for sm_90,
and the kernels a step, a token and a layer launch.

Why count kernels: at batch 1 on the H200 each of a layer's ~14 small kernels (norms, RoPE, K/V writes, the
loop's counter) took 1.2-2.6 us whatever its size, ~1 ms of a 4.9 ms token (RESULTS.md, session 30). Fusing
them is the lever left for batch 1, and how many a layer launches can be read off the compiled HLO without a GPU.

XLA compiles for a GPU it is only told about (a compile-only topology from the CUDA plugin), so this needs the
plugin of the lent GPU's jax, in a Python 3.12 environment of its own (no CUDA driver, no GPU):

    python3.12 -m venv /tmp/v12 && /tmp/v12/bin/pip install jax==0.11.2 jaxlib==0.11.2 \\
        jax-cuda12-plugin==0.11.2 jax-cuda12-pjrt==0.11.2 && /tmp/v12/bin/pip install -e .
    JAX_PLATFORMS=cpu /tmp/v12/bin/python benchmarks/gpu_hlo.py --shape llama-3.1-8b --rows 1 --list

(This machine's jax 0.10.2 with `jax-cuda12-plugin==0.10.2` and `jax-cuda12-pjrt==0.10.2` installed with --no-deps into
a folder on PYTHONPATH works too: its compile stops after XLA's optimizations, and the tool reads XLA's dump of them.)

What it cannot see: kernels a library call launches inside (a cuBLAS GEMM may be two), autotuning (none
without a device: XLA takes its defaults), and any time. The flags are the CLI's (`jinfer.runtime.xla_flags`);
`--xla-flags` adds more.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import xla_glue  # after the path: run as a script

# The H200 as XLA's GpuTargetConfigProto describes a device (text format): the fields its compiler reads.
H200 = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 151397597184 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H200"
"""

# HLO ops that launch nothing (bookkeeping, views, the loops themselves); an async op's "-done" half waits.
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
             "after-all", "opt-barrier"}


def computations(hlo: str) -> dict[str, list[str]]:
    """Each computation's name -> its instruction lines."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif line.startswith("}"):
            cur = None
        elif cur is not None and line.strip().startswith(("%", "ROOT")):
            cur.append(line.strip())
    return comps


def opcode(line: str) -> str:
    m = re.search(r"[\]})] ([a-z][\w\-]*)\(", line.split(" = ", 1)[-1])  # the shape ends, the opcode follows
    return m.group(1) if m else "?"


def kernels(lines: list[str]) -> list[tuple[str, str]]:
    """(name, what) of each kernel an instruction list launches: a fusion's kind or a custom call's target,
    with the jax op it came from."""
    out = []
    for line in lines:
        op = opcode(line)
        if op in NO_KERNEL or op.endswith("-done"):
            continue
        name = re.search(r"%([\w.\-]+) =", line).group(1)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        src = re.search(r'op_name="([^"]*)"', line)
        what = target.group(1) if target else op
        out.append((name, f"{what:<24} {src.group(1).split('/')[-1] if src else ''}"))
    return out


def loops(comps: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(parent computation, body, condition) of every while loop."""
    found = []
    for name, lines in comps.items():
        for line in lines:
            if opcode(line) == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
                found.append((name, body, cond))
    return found


def census(hlo: str) -> dict:
    """Kernels of the layer loop (the loop whose body holds the attention kernel) per layer, of the decode loop
    around it per step, and of the rest per block (a prefill step: no decode loop, the rest is the step's)."""
    comps = computations(hlo)
    nest = loops(comps)
    layer = next(((b, c, p) for p, b, c in nest if any("attention" in line for line in comps[b])), None)
    if layer is None:  # a prefill step of unrolled layers: straight-line code, no loop at all
        entry = re.search(r"^ENTRY %([\w.\-]+)", hlo, re.M).group(1)
        return {"layer": [], "step": kernels(comps[entry]), "block": []}
    if sum(opcode(line) == "custom-call" and "ragged_paged_attention_q" in line for line in comps[layer[0]]) > 1:
        # Unrolled layers (`ModelOps.unroll`): the loop holding the attention is the decode loop, no layer loop.
        return {"layer": [], "step": kernels(comps[layer[0]]) + kernels(comps[layer[1]]),
                "block": kernels(comps[layer[2]])}
    step = next(((b, c, p) for p, b, c in nest if b == layer[2]), None)
    count = {"layer": kernels(comps[layer[0]]) + kernels(comps[layer[1]])}
    if step is None:
        count["step"] = kernels(comps[layer[2]])
    else:
        count["step"] = kernels(comps[step[0]]) + kernels(comps[step[1]])
        count["block"] = kernels(comps[step[2]])
    return count


def build_runner(args, shape_of_step: bool = True):
    """A Runner of the engine's step functions over abstract arrays on a compile-only H200 (its __init__ would place
    real ones on a real device), configured as `args` say, and the XLA dump folder. shape_of_step: the one step of
    `args.rows` / `args.prefill`; else the buckets and speculation of `--all-shapes`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    dump = tempfile.mkdtemp()
    os.environ["XLA_FLAGS"] += f" --xla_dump_to={dump}"  # XLA reads its flags when the plugin starts, next line
    device = topologies.get_topology_desc("", "cuda", target_config=H200, topology="1x1x1").devices[0]
    # The engine asks jax which device it runs on (kernels, tuning tables): here, the one compiled for.
    jax.devices = jax.local_devices = lambda *a, **k: [device]
    jax.config.update("jax_default_device", device)

    from benchmarks import weight_layout
    from benchmarks.model_shapes import SHAPES
    from jinfer.attention.backend import paged_kv_cache
    from jinfer.attention.select import default_backend
    from jinfer.engine.config import EngineConfig
    from jinfer.models import llama
    from jinfer.quant.params import cast_params
    from jinfer.runtime import runner as runner_module
    from jinfer.runtime.matmul import kernel_layout
    from jinfer.runtime.runner import Runner
    from jinfer.runtime.spec.drafters import EarlyExitDrafter
    from jinfer.runtime.step import SlotState

    weight_layout.apply(args.out_in)
    xla_glue.apply(args)
    c, dtype = SHAPES[args.shape], jnp.dtype(args.dtype)
    R = args.rows
    spec = None if shape_of_step or not args.speculative else {"method": args.speculative,
                                                                  "num_speculative_tokens": args.k}
    buckets = ((args.prefill,) if args.prefill else None) if shape_of_step else tuple(args.token_buckets)
    ec = EngineConfig(max_slots=R, dtype=args.dtype, num_pages=args.pages, decode_steps=args.decode_steps,
                      token_buckets=buckets, decode_buckets=None if shape_of_step or not args.decode_buckets
                      else tuple(args.decode_buckets), **({} if shape_of_step or not args.chunk
                                                          else {"max_prefill_chunk": args.chunk}),
                      quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                      speculative=spec).resolve("gpu")

    ops = runner_module.model_ops("gpu", 1)

    def params():  # as Runner.__init__ prepares them on one GPU
        p = runner_module.prepare_weights(llama.init_params(c, jax.random.key(0), dtype), ec, ops, fuse=True)
        return kernel_layout(cast_params(p, dtype), device.device_kind)

    def state():
        kv = (c.num_layers, ec.num_pages, ec.page_size, c.num_kv_heads, c.head_dim)
        return paged_kv_cache(*kv, dtype, ec.kv_cache_dtype), SlotState.zeros(R, c.vocab_size)

    on_device = SingleDeviceSharding(device)

    def abstract(tree):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), tree)

    runner = object.__new__(Runner)
    runner.model_config, runner.config, runner.mesh, runner.draft_params, runner.draft_kv = c, ec, None, None, None
    runner.drafter = (EarlyExitDrafter(ec.speculative.draft_layers(c.num_layers))
                      if spec and spec["method"] == "early_exit" else None)
    runner.max_pages_per_seq = -(-ec.context_len(c.max_position_embeddings) // ec.page_size)
    runner.attention = default_backend(c.num_kv_heads, c.num_heads, R, ec.page_size)
    runner.ops, runner.plain_steps, runner.num_compilations = ops, True, 0
    unrolled = runner.ops.unroll
    runner.params = abstract(jax.eval_shape(lambda: llama.unstack_layers(params()) if unrolled else params()))
    runner.kv, runner.state = abstract(jax.eval_shape(state))
    runner._step = jax.jit(runner._step_impl, static_argnames=("shape",), donate_argnums=(1, 2, 4))
    return runner, dump


def compile_step(args) -> str:
    """The optimized HLO of one plain greedy decode block of `args.rows` rows, or with `args.prefill` a prefill
    step of that many tokens, compiled for the H200."""
    from jinfer.runtime.runner import StepShape

    runner, dump = build_runner(args)
    T, R = args.prefill, args.rows
    shape = (StepShape(False, T, R, min(T, runner.config.max_prefill_chunk), plain="greedy") if T
             else StepShape(True, R, R, 1, plain="greedy"))
    lowered = runner.lowered(shape, 1)
    try:
        return lowered.compile().as_text()
    except Exception as e:  # jax 0.10.2's plugin fails after optimizing (buffer assignment): its dump stands
        found = glob.glob(f"{dump}/*after_optimizations.txt")
        if not found:
            raise
        print(f"compile stopped after XLA's optimizations ({str(e)[:80]}...); reading its dump", file=sys.stderr)
        return open(found[0]).read()


def compile_all_shapes(args) -> int:
    """Compiles every step shape the engine warms up (`Runner.all_shapes`) for the H200, as the engine configured
    by `args` would on one: the dry run of a GPU benchmark's warm-up, the Pallas kernels' Triton compile
    included. Prints each shape's kernels and compile time; returns the number of shapes that failed."""
    import time

    runner, _ = build_runner(args, shape_of_step=False)
    failed = 0
    shapes = runner.all_shapes()
    print(f"{args.shape} {args.dtype} quantization={args.quantization} kv={args.kv_cache_dtype} "
          f"speculative={args.speculative}: {len(shapes)} step shapes")
    for shape in shapes:
        t0 = time.perf_counter()
        try:
            hlo = runner.lowered(shape, 1).compile().as_text()
        except Exception as e:  # reported; the other shapes still compile
            failed += 1
            print(f"  FAILED {shape}: {type(e).__name__}: {str(e)[:300]}")
            continue
        count = census(hlo)
        n = sum(len(v) for v in count.values())
        print(f"  ok {shape}: {n} kernels in its computations, {time.perf_counter() - t0:.1f} s")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", help="benchmarks/model_shapes.py")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=1, help="the decode block's rows (max_slots; with --all-shapes too)")
    ap.add_argument("--prefill", type=int, default=0, metavar="T", help="a prefill step of T tokens instead")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--out-in", default=None, help="as benchmarks/weight_layout.py")
    ap.add_argument("--xla-flags", default="", help="more XLA flags, after the CLI's")
    xla_glue.add_flag(ap)
    ap.add_argument("--list", action="store_true", help="name every kernel of a layer (of a step, unrolled)")
    ap.add_argument("--all-shapes", action="store_true",
                    help="compile every step shape the engine warms up (needs jax 0.11.2's plugin), with:")
    ap.add_argument("--decode-buckets", type=int, nargs="+", default=None, help="default: the engine's for --rows")
    ap.add_argument("--token-buckets", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--chunk", type=int, default=None, help="max_prefill_chunk (default: the engine's)")
    ap.add_argument("--speculative", default=None, choices=("ngram", "early_exit"))
    ap.add_argument("--k", type=int, default=4, help="speculative tokens")
    ap.add_argument("--hlo-out", default=None, help="also write the optimized HLO there")
    args = ap.parse_args()

    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()
    os.environ["XLA_FLAGS"] += " " + args.xla_flags
    if args.all_shapes:
        sys.exit(1 if compile_all_shapes(args) else 0)
    hlo = compile_step(args)
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(hlo)
    import jax

    from benchmarks.model_shapes import SHAPES

    L = SHAPES[args.shape].num_layers
    count = census(hlo)
    per_layer, per_step = len(count["layer"]), len(count.get("step", ()))
    if not count["layer"]:  # unrolled: a step's kernels are its layers'
        print(f"unrolled layers: {per_step} kernels a {'prefill' if args.prefill else 'decode'} step "
              f"({per_step / L:.2f} a layer), {len(count['block'])} a block outside its steps")
        if args.list:
            for name, what in count["step"]:
                print(f"  {name:<40} {what}")
        return
    what = (f"a prefill step of {args.prefill} tokens" if args.prefill else
            f"a decode block of {args.rows} rows x {args.decode_steps} steps")
    print(f"jax {jax.__version__}, compiled for the H200 (sm_90) without one; {args.shape} {args.dtype}"
          f"{' ' + args.quantization if args.quantization else ''}, {what}")
    if args.prefill:
        print(f"kernels: {per_layer} a layer, {per_step} outside the layers -> {per_layer * L + per_step} a step")
    else:
        print(f"kernels: {per_layer} a layer, {per_step} a step outside the layers, {len(count['block'])} a block "
              f"outside its steps -> {per_layer * L + per_step} a token ({L} layers)")
    kinds = Counter(what.split()[0] for _, what in count["layer"])
    print("a layer's by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    if args.list:
        for name, what in count["layer"]:
            print(f"  {name:<40} {what}")


if __name__ == "__main__":
    main()
