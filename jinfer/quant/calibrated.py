"""Calibrated weight quantization of a params pytree: one entry for every method (issue 13).

    params = quantize_calibrated(params, llama_calibration(config), "awq", 4, 128, token_seqs, progress)

Methods (jinfer.quant.formats.CALIBRATED_METHODS): "rtn" (round to nearest, no calibration: the baseline),
"gptq" (jinfer.quant.gptq), "awq" (jinfer.quant.awq), "smoothquant" (W8A8 with smoothing scales,
jinfer.quant.smoothquant) and "w8a8" (the same without smoothing, no calibration). The layer matmul weights
become QTensors; the embedding, LM head and norms stay as they are. The model comes in as its calibration
stages (`jinfer.models.calibration.llama_calibration(config)`), because jinfer.quant sits below
jinfer.models and cannot import it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax.numpy as jnp

from jinfer.quant.awq import awq_quantize
from jinfer.quant.calibration import CalibrationModel, Progress, calibrate_layers
from jinfer.quant.formats import NEEDS_CALIBRATION, check_calibrated
from jinfer.quant.gptq import gptq_quantize
from jinfer.quant.qtensor import is_qtensor
from jinfer.quant.rtn import quantize
from jinfer.quant.smoothquant import ALPHA, smoothquant_quantize


def quantize_calibrated(params: dict, model: CalibrationModel, method: str, bits: int, group_size: int | None,
                        calibration_tokens: Sequence, progress: Progress | None = None, *,
                        act_order: bool = False, alpha: float = ALPHA) -> dict:
    """The params with every layer matmul weight quantized by `method` at `bits` (4 | 8), `group_size` inputs
    per scale (None: the format's default; 0: per output channel; W8A8 methods need 0), calibrated on
    `calibration_tokens` (a list of i32 token sequences; ignored by rtn and w8a8). progress(done, total) is
    called after each layer. act_order: GPTQ's order of decreasing diag(H); alpha: SmoothQuant's migration
    strength."""
    g = check_calibrated(method, bits, group_size)
    if not isinstance(model, CalibrationModel):
        raise TypeError(f"model={type(model).__name__} must be a CalibrationModel: pass "
                        f"jinfer.models.calibration.llama_calibration(config), not the config itself")
    fmt = f"int{bits}"
    if method not in NEEDS_CALIBRATION:  # rtn, w8a8: each weight alone, all layers at once
        layers = dict(params["layers"])
        for name, n_in in model.input_axes.items():
            if name in layers and not is_qtensor(layers[name]):
                qt = quantize(jnp.asarray(layers[name]), fmt=fmt, n_in=n_in, group_size=g, lead=1)
                layers[name] = dataclasses.replace(qt, act="int8") if method == "w8a8" else qt
        if progress is not None:
            num_layers = len(params["layers"][next(iter(model.input_axes))])
            for i in range(num_layers):
                progress(i + 1, num_layers)
        return {**params, "layers": layers}
    if method == "gptq":
        fn = functools.partial(_by_keyword, gptq_quantize, bits=bits, group_size=g, act_order=act_order)
    elif method == "awq":
        fn = functools.partial(_by_keyword, awq_quantize, bits=bits, group_size=g)
    else:
        fn = functools.partial(_by_keyword, smoothquant_quantize, alpha=alpha)
    return calibrate_layers(params, model, calibration_tokens, fn, progress)


def _by_keyword(method, w, x, n_in, **options):
    return method(w, x, n_in=n_in, **options)
