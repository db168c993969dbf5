"""jinfer's own checkpoint format: an orbax checkpoint of the params pytree, with config.json beside it.

Layout of a checkpoint directory:

    config.json                         ModelConfig.to_hf_config(), as an HF directory would carry it
    params/                             the params pytree, written by orbax's StandardCheckpointer
    quantization.json                   (quantized params only) what each QTensor leaf is (quant_record.py)
    tokenizer.json, tokenizer_config.json   (when a tokenizer was given to save_orbax)

`restore_orbax` builds the abstract target from `param_shapes(config)` and the stored dtypes, so orbax
reads each leaf straight into device arrays, onto the given shardings when a mesh is in use (every host
reads only its shards; nothing is gathered). Values come back bit-identical unless a dtype is asked for
(quantized leaves always come back as stored).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from jinfer.checkpoints import quant_record
from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.safetensors_io import read_hf_config
from jinfer.models.config import ModelConfig
from jinfer.models.llama import param_shapes

PARAMS_DIR = "params"


def save_orbax(path: str | os.PathLike, config: ModelConfig, params: dict, tokenizer=None,
               quantization: dict | None = None) -> None:
    """Writes config.json, params/ (replacing an earlier params/ there), quantization.json when some leaves
    are QTensors (`quantization`: how they were made, recorded as given) and, if given, the tokenizer."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()  # orbax wants absolute paths
    _check_params(config, params)
    plain, leaves = quant_record.split(params)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
    quant_record.write(path, quantization, leaves)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, plain, force=True)
        ckptr.wait_until_finished()  # the save is asynchronous; return only once it is on disk
    if tokenizer is not None:
        tokenizer.save(path)


def save_orbax_atomic(path: str | os.PathLike, config: ModelConfig, params: dict, tokenizer=None,
                      quantization: dict | None = None) -> Path:
    """save_orbax into a directory beside `path`, then renamed onto it (replacing what was there), so an
    interrupted write leaves no half checkpoint where a reader looks. Returns the absolute path."""
    path = Path(path).absolute()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an earlier interrupted write left
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_orbax(tmp, config, params, tokenizer, quantization)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _check_params(config: ModelConfig, params: dict) -> None:
    want = param_shapes(config)
    flat_want = dict(_flatten(want))
    try:
        flat_got = dict(_flatten(params))
    except AttributeError as e:
        raise CheckpointError(f"params must be a nested dict of arrays: {e}") from e
    if flat_got.keys() != flat_want.keys():
        raise CheckpointError(f"params leaves {sorted(flat_got)} differ from the config's {sorted(flat_want)}")
    for name, shape in flat_want.items():
        if tuple(flat_got[name].shape) != shape:
            raise CheckpointError(f"params leaf {name!r} has shape {list(flat_got[name].shape)}; "
                                  f"the config implies {list(shape)}")


def _flatten(tree: dict, prefix: str = ""):
    """Yields ('layers/wq', leaf) pairs; tuples (shapes) count as leaves."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def restore_orbax(path: str | os.PathLike, dtype=None, shardings=None) -> tuple[ModelConfig, dict]:
    """Reads a checkpoint written by save_orbax -> (config, params of jax arrays).

    dtype: cast every leaf to it while reading (None keeps the stored dtypes, bit for bit).
    shardings: a jax.sharding.Sharding for every leaf, or a pytree of them shaped like params; None puts
    everything on the default device.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    params_dir = path / PARAMS_DIR
    if not path.is_dir():
        raise CheckpointError(f"orbax checkpoint directory {str(path)!r} does not exist")
    config = read_hf_config(path)
    if not params_dir.is_dir():
        raise CheckpointError(f"{str(params_dir)!r} does not exist (not an orbax checkpoint written by save_orbax)")

    shapes = param_shapes(config)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, shapes, is_leaf=_is_shape)
    cast = None if dtype is None else np.dtype(dtype)
    record = quant_record.read(path)
    quantized = {} if record is None else record["leaves"]

    with ocp.StandardCheckpointer() as ckptr:
        stored = _stored_metadata(ckptr, params_dir)

        def array(name, sharding, want_shape=None, keep_dtype=False):
            meta = stored.get(name)
            if meta is None:
                raise CheckpointError(f"{str(params_dir)!r} lacks the leaf {name!r} that config.json implies")
            if want_shape is not None and tuple(meta.shape) != want_shape:
                raise CheckpointError(f"leaf {name!r} in {str(params_dir)!r} has shape {list(meta.shape)}; "
                                      f"config.json implies {list(want_shape)}")
            keep = keep_dtype or cast is None
            return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype if keep else cast, sharding=sharding)

        def target(name, shape, sharding):
            if name not in quantized:
                return array(name, sharding, shape)
            # A quantized leaf's arrays keep their stored types; their shapes are checked once restored. A mesh
            # sharding meant for the float leaf does not fit them: they come replicated, for the runner to split.
            if not isinstance(sharding, jax.sharding.SingleDeviceSharding):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            return {a: array(f"{name}/{a}", sharding, keep_dtype=True) for a in quantized[name]["arrays"]}

        flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
        try:
            flat_shardings = treedef.flatten_up_to(shardings)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"shardings do not match the params tree of {str(path)!r}: {e}") from e
        names = ["/".join(k.key for k in key_path) for key_path, _ in flat_shapes]
        unknown = sorted(set(quantized) - set(names))
        if unknown:
            raise CheckpointError(f"{str(path / quant_record.RECORD_FILE)!r} records {unknown}, which config.json "
                                  f"does not imply")
        abstract = treedef.unflatten([target(name, shape, sharding) for name, (_, shape), sharding
                                      in zip(names, flat_shapes, flat_shardings)])
        try:
            params = ckptr.restore(params_dir, abstract)
        except Exception as e:  # tensorstore raises ValueError/OSError on truncated or corrupt chunks
            raise CheckpointError(f"could not restore {str(params_dir)!r}: {e}") from e
    if quantized:
        leaves = treedef.flatten_up_to(params)
        params = treedef.unflatten([
            quant_record.join(name, leaf, quantized[name], shape) if name in quantized else leaf
            for name, (_, shape), leaf in zip(names, flat_shapes, leaves)])
    return config, params


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _stored_metadata(ckptr, params_dir: Path) -> dict:
    """'layers/wq' -> the stored array's metadata (shape, dtype), read without reading the arrays."""
    try:
        meta = ckptr.metadata(params_dir)
    except Exception as e:
        raise CheckpointError(f"{str(params_dir)!r} has no readable orbax metadata: {e}") from e
    # Checkpointer.metadata returns StepMetadata whose item_metadata is a TreeMetadata (orbax >= 0.11).
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{str(params_dir)!r} has no readable orbax metadata (got {type(tree).__name__})")
    return dict(_flatten(tree))
