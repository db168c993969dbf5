"""Where the engine's time goes, per dispatched step: host, dispatch, and the compiled step split into model
(the layers' matmuls and norms), attention, LM head and sampling, from a profiler trace of one workload run
through the engine as `LLM` runs it.

    python benchmarks/step_profile.py --model smollm2 --workload decode_b1        # the CPU, a real model
    python benchmarks/step_profile.py --shape llama-3.1-8b --dtype bfloat16 --workload decode_b1   # GPU

The device ops are sorted by the jax named scopes of the step (`attention` in jinfer/attention/backend.py,
`sampling` and `lm_head` in jinfer/runtime/step.py), read from each op's metadata in the compiled HLO.
"host" is the engine's Python time per step not spent waiting for the device (scheduling, padding,
detokenizing); "dispatch" the time inside the jitted call's Python entry; the device columns add up the
ops' own durations (on the CPU the host thread runs them, so they overlap nothing).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import weight_layout, xla_glue

if os.environ.get("JINFER_XLA_DEFAULTS") != "1":  # the flags the CLI applies; =1 profiles XLA's own defaults
    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the jax scope and primitive it came from)."""
    return dict(m.groups() for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text))


def category(op_name: str) -> str:
    return ("attention" if "/attention/" in op_name else "lm_head" if "/lm_head/" in op_name
            else "sampling" if "/sampling/" in op_name else "model")


def is_collective(kernel: str) -> bool:
    """NCCL's kernels and XLA's own collectives (their names are not in the HLO's op_name metadata)."""
    return kernel.startswith("nccl") or any(c in kernel.lower() for c in ("all-reduce", "allreduce", "all-gather"))


def idle_gaps(kernels: list[dict], steps: int, top: int) -> None:
    """Prints where the device waits: the time in which no kernel runs on any stream, each gap charged to the
    kernel that ended last before it, and how the gaps are spread by length."""
    after, spread = collections.Counter(), collections.Counter()
    bins = ((5, "<5us"), (20, "5-20us"), (100, "20-100us"), (float("inf"), ">100us"))
    busy_until, last = None, None
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if busy_until is not None and e["ts"] > busy_until:
            gap = e["ts"] - busy_until
            after[last] += gap
            spread[next(label for lim, label in bins if gap < lim)] += gap
        if busy_until is None or e["ts"] + e["dur"] >= busy_until:
            busy_until, last = e["ts"] + e["dur"], e["name"]
    print(f"device idle between kernels: {sum(after.values()) / steps / 1e3:.2f} ms/step; by gap length: "
          + ", ".join(f"{label} {spread[label] / steps / 1e3:.2f}" for _, label in bins))
    for name, gap in after.most_common(top):
        print(f"  {gap / steps / 1e3:9.2f} ms/step idle after {name}")


def main():
    from benchmarks.engine_vs_peers import WORKLOADS, prompts_for
    from jinfer.engine.config import EngineConfig
    from jinfer.inputs import SamplingParams
    from jinfer.runtime.build import make_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a loadable model (smollm2); else random weights of --shape")
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workload", default="decode_b1", choices=sorted(WORKLOADS))
    ap.add_argument("--requests", type=int, nargs=3, metavar=("N", "PROMPT", "NEW"), default=None,
                    help="a workload of N random prompts of PROMPT tokens, NEW tokens each, instead of --workload")
    ap.add_argument("--max-slots", type=int, default=None, help="EngineConfig.max_slots (default: platform's)")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="devices the model is split over; device "
                                                                    "times are then per device")
    ap.add_argument("--decode-steps", type=int, default=None, help="EngineConfig.decode_steps (default: platform's)")
    ap.add_argument("--top", type=int, default=0, help="also list the N device ops that took longest in all, "
                                                       "and the N after which the device idled longest")
    ap.add_argument("--speculative-config", default=None, help="JSON, as `jinfer generate` takes it")
    ap.add_argument("--quantization", default=None, help="weight format the engine quantizes to (int8, int4, fp8)")
    weight_layout.add_flag(ap)
    xla_glue.add_flag(ap)
    ap.add_argument("--hlo-dir", default=None, help="also write each compiled shape's optimized HLO there")
    ap.add_argument("--grounded", action="store_true",
                    help="the prompt of benchmarks/spec_speed.py's grounded workload (greedy, stops at EOS)")
    args = ap.parse_args()
    weight_layout.apply(args.out_in)
    xla_glue.apply(args)
    tp = args.tensor_parallel
    if args.model:
        from jinfer.checkpoints.load import load

        loaded = load(args.model)
        config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    else:
        from benchmarks.model_shapes import SHAPES
        from jinfer.models import llama

        config, tokenizer = SHAPES[args.shape], None
        params = jax.jit(llama.init_params, static_argnums=(0, 2))(config, jax.random.key(0), jnp.dtype(args.dtype))
    spec = None
    if args.speculative_config:
        from jinfer.engine.spec.config import SpeculativeConfig

        spec = SpeculativeConfig.from_dict(json.loads(args.speculative_config)).resolve(jax.default_backend())
    engine = make_engine(config, params, tokenizer, EngineConfig(dtype=args.dtype, decode_steps=args.decode_steps,
                                                            max_slots=args.max_slots, speculative=spec,
                                                            tensor_parallel=args.tensor_parallel,
                                                            quantization=args.quantization))
    engine.warmup()
    n, _, new = args.requests or WORKLOADS[args.workload]
    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=not args.grounded)

    def prompts(i):
        if args.requests:
            rng = np.random.default_rng(i)
            return [list(map(int, rng.integers(100, config.vocab_size, args.requests[1]))) for _ in range(n)]
        if not args.grounded:
            return prompts_for(args.workload, i, config.vocab_size)
        from benchmarks.spec_speed import grounded_prompts

        return [engine.inputs.chat([{"role": "user", "content": p}]).ids for p in grounded_prompts(n)]

    def run(i):
        for p in prompts(i):
            engine.add_request(p, sp)
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        return steps

    run(0)  # warm caches
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    steps = run(1)
    wall = time.perf_counter() - t
    jax.profiler.stop_trace()
    if os.environ.get("KEEP_TRACE"):
        print("trace in", trace_dir)

    names = {}
    for i, shape in enumerate(engine.runner.all_shapes()):
        text = engine.runner.compiled_text(shape, engine.scheduler.stop_width)
        names.update(op_names(text))
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"shape{i}.txt"), "w") as f:
                f.write(f"# {shape}\n{text}")
    hlo = {k: category(v) for k, v in names.items()}
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    total, by_op, count, kernels = collections.Counter(), collections.Counter(), collections.Counter(), []
    for e in events:
        if e.get("args", {}).get("hlo_module", "").startswith("jit__step_impl"):
            kernels.append(e)
            total["collective" if is_collective(e["name"]) else hlo.get(e["name"], "model")] += e["dur"] / tp
            by_op[e["name"]] += e["dur"] / tp
            count[e["name"]] += 1 / tp
        elif e["name"].startswith("PjitFunction(_step_impl)"):
            total["dispatch"] += e["dur"]
        elif re.search(r"engine\.py:\d+ step$", e["name"]):
            total["engine.step"] += e["dur"]
        elif re.search(r"runner\.py:\d+ fetch$", e["name"]):
            total["fetch"] += e["dur"]
    device = sum(total[k] for k in ("model", "attention", "lm_head", "sampling", "collective"))
    host = total["engine.step"] - total["fetch"] - total["dispatch"]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.model or args.shape} {args.dtype}; "
          f"workload {'custom' if args.requests else args.workload} ({n} x {new} new tokens): {wall:.2f} s wall, {steps} engine steps, "
          f"decode_steps={engine.config.decode_steps}")
    print(f"{'per step (ms)':<14}" + "".join(f"{k:>11}" for k in
                                              ("host", "dispatch", "model", "attention", "lm_head", "sampling",
                                               "collective", "wall")))
    vals = [host, total["dispatch"], total["model"], total["attention"], total["lm_head"], total["sampling"],
            total["collective"]]
    print(f"{'':<14}" + "".join(f"{v / steps / 1e3:>11.2f}" for v in vals) + f"{wall / steps * 1e3:>11.2f}")
    print(f"device ops {device / 1e6:.2f} s of {wall:.2f} s wall; {len(kernels) / steps / tp:.0f} kernels a step"
          + (f" (device times per device, over {tp})" if tp > 1 else ""))
    for name, dur in by_op.most_common(args.top):
        print(f"  {dur / steps / 1e3:9.3f} ms/step {count[name] / steps:7.1f}x {hlo.get(name, 'model'):<10} "
              f"{name[:50]}  {names.get(name, '')[-70:]}")
    if args.top:  # on one device's streams (a mesh's devices run side by side)
        first = min((e["pid"] for e in kernels), default=None)
        idle_gaps([e for e in kernels if e["pid"] == first], steps, args.top)


if __name__ == "__main__":
    main()
