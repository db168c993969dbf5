"""HF directories whose config.json has a `quantization_config`: the layer matmul weights stay quantized.

`quant_method` picks the reader of each linear module's tensors ("awq", "gptq": `checkpoints.awq_gptq`;
"compressed-tensors": `checkpoints.compressed_tensors_import`); each gives a `StoredWeight`, or None for a
module the checkpoint left in float, and `checkpoints.quantized_weight` turns the layers of each leaf into one
stacked QTensor (or a float leaf where the format has no exact QTensor form). The embedding, norms and LM
head are read as in any HF directory (quantizers leave them in float).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from jinfer.checkpoints.awq_gptq import read_awq, read_gptq, setting
from jinfer.checkpoints.compressed_tensors_import import read_compressed, warn_activations
from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.hf_names import HFTensor
from jinfer.checkpoints.quantized_weight import float_reason, stack_layers, to_leaf
from jinfer.checkpoints.tensor_files import TensorFiles
from jinfer.models.llama import MATMUL_INPUT_AXES
from jinfer.quant.qtensor import QTensor

READERS = {"awq": read_awq, "gptq": read_gptq, "compressed-tensors": read_compressed}


def quantization_config(path: str | os.PathLike) -> dict | None:
    """config.json's `quantization_config` (None when the checkpoint is float); a method jinfer does not read
    raises CheckpointError."""
    file = Path(path) / "config.json"
    try:
        qcfg = json.loads(file.read_text()).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable JSON object: {e}") from e
    if qcfg is None:
        return None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method not in READERS:
        raise CheckpointError(f"{str(file)!r}: quantization_config.quant_method={method!r}; jinfer reads "
                              f"{sorted(READERS)}")
    return qcfg


def quantization_record(qcfg: dict) -> dict:
    """What LoadedModel.quantization reports of a checkpoint stored quantized."""
    method = qcfg["quant_method"]
    if method == "compressed-tensors":
        return {"method": method, "format": qcfg.get("format")}
    return {"method": method, "bits": setting(qcfg, "bits", "w_bit", default=4),
            "group_size": setting(qcfg, "group_size", "q_group_size", default=-1)}


def is_quantized_matmul(spec: HFTensor) -> bool:
    """A layer matmul weight: the tensors a quantized checkpoint may replace by its own."""
    return spec.layer is not None and spec.leaf[-1] in MATMUL_INPUT_AXES


def load_quantized_layers(tensors: TensorFiles, specs: list[HFTensor], qcfg: dict, dtype) -> dict:
    """leaf name -> the stacked leaf (QTensor, or floats in `dtype`) of every layer matmul weight in `specs`."""
    method = qcfg["quant_method"]
    if method == "compressed-tensors":
        warn_activations(qcfg)
    read = READERS[method]
    parts, floats = defaultdict(list), defaultdict(list)  # floats: why -> modules dequantized for that reason
    for spec in specs:  # layer by layer, in file order
        module = spec.hf_name.removesuffix(".weight")
        stored = read(tensors, module, spec, qcfg)
        if stored is not None:
            n_in = MATMUL_INPUT_AXES[spec.leaf[-1]]
            leaf = to_leaf(stored, spec, n_in)
            if not isinstance(leaf, QTensor):
                floats[float_reason(stored, spec, n_in)].append(module)
            parts[spec.leaf[-1]].append(leaf)
            continue
        w = tensors.get_checked(spec.hf_name, spec.hf_shape, "f")
        parts[spec.leaf[-1]].append(spec.to_jinfer(np.asarray(w)))
    for why, modules in floats.items():  # one warning per reason, not one per module
        warnings.warn(f"{len(modules)} weights ({modules[0]}, ...) are dequantized to float: {why}", stacklevel=3)
    return {leaf: stack_layers(leaf, layers, dtype) for leaf, layers in parts.items()}
