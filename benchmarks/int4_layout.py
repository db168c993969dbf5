"""`--int4-layout` of the engine benchmarks: the layout the GPU kernel reads int4 weights in, for this process,
instead of the tuning table's (`jinfer.kernels.quant_matmul.tuning.INT4_LAYOUT`), so one machine can time both."""

from __future__ import annotations

import argparse


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--int4-layout", default=None, choices=["in_out", "out_in"],
                    help="int4 weights on the GPU kernel: the importers' layout or outputs-first (default: the table's)")


def apply(layout: str | None) -> None:
    if layout is not None:
        from jinfer.kernels.quant_matmul import tuning

        tuning.INT4_LAYOUT = {"": layout}  # "" is in every device kind
