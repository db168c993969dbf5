"""Quantizing a params pytree: which leaves, in which format (the `quantization=` of LLM and EngineConfig)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.quant.formats import DEFAULT_GROUP_SIZE, check_quantization
from jinfer.quant.qtensor import QTensor, is_qtensor
from jinfer.quant.rtn import quantize


def quantize_params(params: dict, input_axes: dict[str, int], method: str, group_size: int | None = None) -> dict:
    """The params with each layer matmul weight named in `input_axes` (name -> contracted leading axes after
    the stacked layer axis; `jinfer.models.llama.MATMUL_INPUT_AXES`) quantized by round to nearest. The
    embedding, LM head and norms stay as they are."""
    check_quantization(method, group_size)
    g = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    layers = dict(params["layers"])
    for name, n_in in input_axes.items():
        if name in layers and not is_qtensor(layers[name]):
            layers[name] = quantize(jnp.asarray(layers[name]), fmt=method, n_in=n_in, group_size=g, lead=1)
    return {**params, "layers": layers}


def cast_params(params: dict, dtype) -> dict:
    """Float leaves to `dtype`; a QTensor stays as stored (its scales keep their own float type)."""
    def cast(x):
        if is_qtensor(x):
            return x
        return x.astype(dtype) if isinstance(x, jax.Array) else jnp.asarray(x, dtype)  # a placed array stays put

    return jax.tree_util.tree_map(cast, params, is_leaf=is_qtensor)


def param_bytes(params: dict) -> int:
    """Bytes of every array of the params, quantized leaves as stored."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_qtensor)
    return sum(x.nbytes if isinstance(x, QTensor) else int(x.size) * x.dtype.itemsize for x in leaves)
