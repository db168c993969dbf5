"""`--xla-glue` of the engine benchmarks: the per-layer glue as XLA computes it (RMSNorm, RoPE and the K/V page
writes as XLA fusions) instead of the GPU's Pallas kernels (`jinfer.kernels.rms_norm`, `jinfer.kernels.rope_kv`),
for this process, so one machine can time both in the same run."""

from __future__ import annotations

import argparse


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--xla-glue", action="store_true",
                    help="norms, RoPE and K/V writes through XLA, not the GPU's Pallas kernels (a before/after run)")


def apply(xla_glue: bool) -> None:
    if not xla_glue:
        return
    from jinfer.attention.pallas import PallasBackend
    from jinfer.runtime import ops, runner

    model_ops = ops.model_ops

    def xla_norm_ops(platform: str, num_devices: int):
        return model_ops(platform, num_devices)._replace(norm=ops.ModelOps().norm)

    runner.model_ops = xla_norm_ops  # the runner's own name for it
    PallasBackend.rope_kv_kernel = False
