"""Load a model from whatever the user names: a registered name, a GGUF file, an HF directory, an orbax
checkpoint, or (where a network allows) a Hugging Face hub id. Every path ends in the same triple:
(ModelConfig, params pytree, Tokenizer).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from jinfer.checkpoints.errors import CheckpointError
from jinfer.models.config import ModelConfig


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict  # numpy or jax arrays in the layout of jinfer.models.llama
    tokenizer: object  # jinfer.text.tokenizer.Tokenizer
    quantization: dict | None = None  # how a checkpoint stored quantized was made ({"method": ..., ...}), else None


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load(model: str | os.PathLike, dtype=np.float32, progress=None, quantization: str | None = None) -> LoadedModel:
    """`quantization="gguf"` keeps a GGUF file's Q8_0 / Q4_0 / Q4_1 layer weights in their blocks (QTensor
    leaves); any other value is applied later, by the runner, to whatever this returns."""
    from jinfer.checkpoints.registry import MODELS
    from jinfer.text.tokenizer import Tokenizer

    path = Path(model)
    if not path.exists() and str(model) in MODELS:
        from jinfer.checkpoints.pull import gguf_path, pull

        # A registered model comes as a GGUF file, converted to orbax once; its blocks live in the file.
        path = gguf_path(str(model)) if quantization == "gguf" else pull(str(model))
    if path.is_file():
        if not is_gguf_file(path):
            raise CheckpointError(f"{str(path)!r} is not a GGUF file (no GGUF magic bytes)")
        from jinfer.checkpoints.gguf_import import load_gguf
        from jinfer.checkpoints.gguf_vocab import tokenizer_from_gguf_fields

        config, params, fields = load_gguf(path, dtype=dtype, progress=progress, keep_blocks=quantization == "gguf")
        return LoadedModel(config, params, tokenizer_from_gguf_fields(fields))
    if quantization == "gguf":
        raise CheckpointError(f"quantization='gguf' keeps a GGUF file's blocks, but {str(model)!r} is not a GGUF file")
    if path.is_dir():
        if (path / "params").is_dir():
            from jinfer.checkpoints import quant_record
            from jinfer.checkpoints.orbax_io import restore_orbax

            config, params = restore_orbax(path, dtype=dtype)
            record = quant_record.read(path)
            quantization = None if record is None else record["quantization"] or {"method": "unknown"}
            return LoadedModel(config, params, Tokenizer.from_dir(path), quantization)
        if (path / "config.json").is_file():
            from jinfer.checkpoints.hf_quantized import quantization_config, quantization_record
            from jinfer.checkpoints.safetensors_io import load_hf_dir

            config, params = load_hf_dir(path, dtype=dtype)
            qcfg = quantization_config(path)  # AWQ / GPTQ / compressed-tensors weights load as stored
            return LoadedModel(config, params, Tokenizer.from_dir(path),
                               None if qcfg is None else quantization_record(qcfg))
        raise CheckpointError(
            f"directory {str(path)!r} is neither an orbax checkpoint (params/) nor an HF model (config.json)")
    if "/" in str(model) and not str(model).startswith((".", "/")) and str(model).count("/") == 1:
        return load(_hub_snapshot(str(model)), dtype=dtype, progress=progress, quantization=quantization)
    raise CheckpointError(f"model {str(model)!r} is not a registered name ({sorted(MODELS)}), a file or a directory")


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:
        raise CheckpointError(f"could not download {repo_id!r} from the Hugging Face hub: {e}") from e
