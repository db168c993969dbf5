"""`--xla-glue` of the engine benchmarks: the per-layer glue as XLA computes it (RMSNorm, RoPE and the K/V page
writes as XLA fusions) instead of the GPU's Pallas kernels (`jinfer.kernels.rms_norm`, `jinfer.kernels.rope_kv`),
for this process, so one machine can time both in the same run. `--scan-layers`: the layers scanned over
stacked weights, as one GPU ran them before the unrolled layers (`jinfer.models.llama.ModelOps.unroll`).
`--unfused-decode`: a decode step's RoPE and K/V write in their own kernel before attention (`rope_and_store`),
not inside it (`PallasBackend.rope_attend`). `--unfolded-norms`: each layer's two RMSNorms as kernels of their
own, their gains not folded into the products (`jinfer.models.llama.fold_norms`). `--decode-splits N`: decode
blocks on N context splits instead of the tuning table's (with 1, no split combine follows the kernel)."""

from __future__ import annotations

import argparse


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--xla-glue", action="store_true",
                    help="norms, RoPE and K/V writes through XLA, not the GPU's Pallas kernels (a before/after run)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="the layers scanned over stacked weights, not unrolled on one GPU (a before/after run)")
    ap.add_argument("--unfused-decode", action="store_true",
                    help="a decode step's RoPE and K/V write as a kernel of their own, not inside attention")
    ap.add_argument("--unfolded-norms", action="store_true",
                    help="each layer's norms as kernels of their own, not folded into the products")
    ap.add_argument("--decode-splits", type=int, default=None,
                    help="context splits of the decode attention kernel (default: the tuning table's)")


def apply(args: argparse.Namespace) -> None:
    """The flags of `add_flag`, parsed into args, for this process."""
    from jinfer.attention.pallas import PallasBackend
    from jinfer.runtime import ops, runner

    model_ops = ops.model_ops
    xla_glue = args.xla_glue

    def chosen_ops(platform: str, num_devices: int):
        chosen = model_ops(platform, num_devices)
        if xla_glue or args.unfolded_norms:
            chosen = chosen._replace(fold_norms=False)
        if xla_glue:
            chosen = chosen._replace(norm=ops.ModelOps().norm)
        return chosen._replace(unroll=False) if args.scan_layers else chosen

    runner.model_ops = chosen_ops  # the runner's own name for it
    if args.decode_splits is not None:
        import dataclasses

        from jinfer.attention import pallas

        table = pallas.gpu_block_sizes

        def sizes(*a, **k):
            decode, mixed = table(*a, **k)
            return dataclasses.replace(decode, num_splits=args.decode_splits), mixed

        pallas.gpu_block_sizes = sizes  # the name `pallas_backend` reads
    if xla_glue:
        PallasBackend.rope_kv_kernel = False
    if args.unfused_decode:
        PallasBackend.rope_decode = False
