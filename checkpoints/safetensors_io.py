"""Hugging Face model directories (config.json + safetensors) to and from jinfer's params pytree.

`load_hf_dir` reads `config.json` into a `ModelConfig`, then the weights from `model.safetensors` or the
shards named by `model.safetensors.index.json`, one tensor at a time into preallocated stacked numpy leaves,
so peak memory stays about one model. `save_hf_dir` writes the same layout back (sharded with an index when
asked), which `transformers.AutoModelForCausalLM.from_pretrained` loads. Tensor names and layouts come
from `checkpoints.hf_names`; every problem with the files raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.hf_names import HFTensor, get_leaf, hf_tensors
from jinfer.checkpoints.hf_quantized import is_quantized_matmul, load_quantized_layers, quantization_config
from jinfer.checkpoints.tensor_files import TensorFiles
from jinfer.models.config import ConfigError, ModelConfig
from jinfer.models.llama import param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers refuses safetensors files without this metadata entry.
_FILE_METADATA = {"format": "pt"}
_HF_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                   np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """`path/config.json` -> ModelConfig; missing, unparsable or unsupported -> CheckpointError."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r} does not exist")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(file)!r} is not readable JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(file)!r} holds a {type(cfg).__name__}, not a JSON object")
    try:
        return ModelConfig.from_hf_config(cfg)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{str(file)!r}: {e}") from e


def _weight_files(path: Path) -> tuple[dict[str, Path], Path]:
    """(HF tensor name -> the safetensors file that holds it, the file that lists them: the single
    safetensors file or the index of the sharded set)."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single), single
    if not index.is_file():
        raise CheckpointError(f"{str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                              "(only safetensors weights are supported)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(index)!r} is not a safetensors index with a 'weight_map': {e}") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{str(index)!r}: 'weight_map' is a {type(weight_map).__name__}, not an object")
    files = {name: path / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise CheckpointError(f"shard {str(shard)!r} named in {str(index)!r} does not exist")
    return files, index


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(os.fspath(file), framework="numpy")
    except Exception as e:  # SafetensorError on a truncated or corrupt header; OSError on unreadable files
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_hf_dir(path: str | os.PathLike, dtype=None) -> tuple[ModelConfig, dict]:
    """Reads an HF Llama/Mistral/Qwen2 directory into (config, params of numpy arrays).

    dtype: the dtype of every leaf (e.g. np.float32, jnp.bfloat16); None keeps each tensor's stored dtype.
    A checkpoint quantized by AutoAWQ, GPTQ or compressed-tensors (a `quantization_config` in config.json) keeps
    its layer matmul weights quantized: QTensor leaves (`checkpoints.hf_quantized`), which `dtype` leaves as
    they are.
    Tensors the model does not use (a tied model's lm_head, rotary caches of old exports) are ignored.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    config = read_hf_config(path)
    files, listing = _weight_files(path)
    dtype = None if dtype is None else np.dtype(dtype)
    qcfg = quantization_config(path)  # None: a float checkpoint
    kept = [s for s in hf_tensors(config) if qcfg is not None and is_quantized_matmul(s)]
    skip = set(kept)

    by_file: dict[Path, list[HFTensor]] = defaultdict(list)
    for spec in hf_tensors(config):
        if spec in skip:  # read below, in the checkpoint's quantized format
            continue
        if spec.hf_name not in files:
            raise CheckpointError(f"tensor {spec.hf_name!r} is missing from {str(listing)!r}")
        by_file[files[spec.hf_name]].append(spec)

    shapes = param_shapes(config)
    params: dict = {"layers": {}}
    for file, specs in by_file.items():
        with _open(file) as f:
            for spec in specs:
                _check_shape(f, file, spec)
                try:
                    t = f.get_tensor(spec.hf_name)
                except Exception as e:
                    raise CheckpointError(f"could not read tensor {spec.hf_name!r} from {str(file)!r}: {e}") from e
                _store(params, shapes, spec, spec.to_jinfer(t), dtype)
    if kept:
        params["layers"].update(load_quantized_layers(TensorFiles(files, listing), kept, qcfg, dtype))
    return config, params


def _check_shape(f, file: Path, spec: HFTensor) -> None:
    try:
        got = tuple(f.get_slice(spec.hf_name).get_shape())
    except Exception as e:  # an index that names a tensor its shard lacks
        raise CheckpointError(f"tensor {spec.hf_name!r} is missing from {str(file)!r}: {e}") from e
    if got != spec.hf_shape:
        raise CheckpointError(f"tensor {spec.hf_name!r} in {str(file)!r} has shape {list(got)}; "
                              f"config.json implies {list(spec.hf_shape)}")


def _store(params: dict, shapes: dict, spec: HFTensor, value: np.ndarray, dtype) -> None:
    """Writes one tensor into its leaf, allocating the leaf (all layers) on the first tensor that needs it."""
    *parents, name = spec.leaf
    dtype = value.dtype if dtype is None else dtype
    node, shape_node = params, shapes
    for key in parents:
        node, shape_node = node[key], shape_node[key]
    if spec.layer is None:
        node[name] = np.ascontiguousarray(value, dtype=dtype)
        return
    if name not in node:
        node[name] = np.empty(shape_node[name], dtype=dtype)
    node[name][spec.layer] = value


def save_hf_dir(path: str | os.PathLike, config: ModelConfig, params: dict,
                max_shard_bytes: int | None = None) -> None:
    """Writes config.json and the weights as safetensors: one `model.safetensors`, or, when the weights
    exceed max_shard_bytes, `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`.
    Earlier safetensors weights in the directory are removed so that no stale file shadows the new ones.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = _as_numpy(params)
    specs = hf_tensors(config)

    # Shards are filled in file order; a tensor larger than the limit gets a shard of its own.
    shards: list[list[HFTensor]] = [[]]
    filled = 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * _leaf(params, spec).dtype.itemsize
        if max_shard_bytes is not None and shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(spec)
        filled += nbytes

    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    hf_config = config.to_hf_config()
    dtypes = {leaf.dtype for leaf in _leaves(params)}
    if len(dtypes) == 1 and next(iter(dtypes)) in _HF_DTYPE_NAMES:
        hf_config["dtype"] = _HF_DTYPE_NAMES[next(iter(dtypes))]
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    if len(shards) == 1:
        save_file(_hf_dict(params, shards[0]), os.fspath(path / SINGLE_FILE), metadata=_FILE_METADATA)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = _hf_dict(params, shard)
        save_file(tensors, os.fspath(path / name), metadata=_FILE_METADATA)
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _as_numpy(params: dict) -> dict:
    # jax arrays (bf16 included, as ml_dtypes.bfloat16) become host numpy arrays once, leaf by leaf.
    return {k: _as_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in params.items()}


def _leaves(params: dict):
    for v in params.values():
        yield from _leaves(v) if isinstance(v, dict) else (v,)


def _leaf(params: dict, spec: HFTensor) -> np.ndarray:
    try:
        leaf = get_leaf(params, spec.leaf)
    except KeyError as e:
        raise CheckpointError(f"params lack the leaf {'/'.join(spec.leaf)!r} needed for {spec.hf_name!r}") from e
    return leaf if spec.layer is None else leaf[spec.layer]


def _hf_dict(params: dict, specs: list[HFTensor]) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs:
        w = _leaf(params, spec)
        if w.shape != spec.shape:
            raise CheckpointError(f"params leaf {'/'.join(spec.leaf)!r} has shape {list(w.shape)} per layer; "
                                  f"the config implies {list(spec.shape)}")
        out[spec.hf_name] = spec.to_hf(w)
    return out
