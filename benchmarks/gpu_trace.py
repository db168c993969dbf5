"""Per-kernel GPU time of a jitted call, from a JAX profiler trace (perfetto JSON): which launches a call
makes and how long each runs, without external tools.

    from benchmarks.gpu_trace import kernel_times
    for name, us in kernel_times(lambda: f(x), iters=20): print(name, us)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

import jax


def gpu_kernels(run) -> list[dict]:
    """The GPU kernel events (perfetto "X" events of the GPU processes) of `run()` under the profiler, in time
    order; `run` must wait for its own results."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run()
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as fh:
            events = json.load(fh)["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    return sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids), key=lambda e: e["ts"])


def kernel_times(fn, iters: int = 20) -> list[tuple[str, float]]:
    """[(kernel name, microseconds per call)], longest first, summed over the GPU streams."""
    jax.block_until_ready(fn())

    def run():
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)

    total = collections.Counter()
    for e in gpu_kernels(run):
        total[e["name"]] += e.get("dur", 0)
    return [(name, dur / iters) for name, dur in total.most_common()]
