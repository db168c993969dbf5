"""`--out-in` of the engine benchmarks: the formats the GPU kernel reads stored outputs-first ("out_in"), for this
process, instead of the tuning table's (`jinfer.kernels.quant_matmul.tuning.OUT_IN_FORMATS`), so one machine can
time both layouts."""

from __future__ import annotations

import argparse


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out-in", default=None, metavar="FORMATS",
                    help="comma-separated formats (int4, int8) stored outputs-first for the GPU kernel, or 'none' "
                         "(default: the tuning table's)")


def apply(formats: str | None) -> None:
    if formats is not None:
        from jinfer.kernels.quant_matmul import tuning

        chosen = tuple(f for f in formats.split(",") if f and f != "none")
        bad = [f for f in chosen if f not in ("int4", "int8")]
        if bad:
            raise SystemExit(f"--out-in {formats!r}: {bad} cannot be stored out_in (int4, int8)")
        tuning.OUT_IN_FORMATS = {"": chosen}  # "" is in every device kind
