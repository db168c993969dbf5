"""Sharding as data: the mesh, and one table from logical axis names to mesh axes.

Every parameter leaf carries logical axis names (`llama.param_axes`), and so does the KV cache
(`KV_CACHE_AXES`). `RULES` maps each name to a mesh axis (or None: replicated); the model code never
mentions a device. Arrays are placed with these shardings and `jit` propagates them through the step.

Tensor parallelism (the `model` axis) is Megatron's: Q/K/V/gate/up are split by output column (heads,
MLP width), O/down by input row, so each layer needs one all-reduce after attention and one after the
MLP; the embedding and LM head are split over the vocabulary. The KV cache is split over KV heads like
K/V themselves, so each device keeps the cache of the heads it computes (a quantized cache's scales too). An axis whose size does not
divide by its mesh axis (fewer KV heads than model shards) is replicated instead.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer.models.config import ModelConfig
from jinfer.quant.qtensor import is_qtensor

MESH_AXES = ("data", "model", "seq")

RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "layers": None,
    "pages": None,
    "page_slot": None,
    "tokens": None,
    "quant_groups": None,  # a quantized weight's groups of inputs (jinfer.quant): its scales stay whole
}

KV_CACHE_AXES = ("layers", "kv_heads", "pages", "page_slot", "head_dim")  # [L, K, P, page_size, H]
KV_SCALE_AXES = KV_CACHE_AXES[:-1]  # [L, K, P, page_size]: a quantized cache's scale per token and head
KV_IMPORT_AXES = ("layers", "tokens", "kv_heads", "head_dim")  # [L, T, K, H]: a prefix's K/V brought in


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, devices=None) -> Mesh:
    """A (data, model, seq) mesh over the first data x model x seq of `devices` (default: this host's)."""
    for name, n in (("data", data), ("model", model), ("seq", seq)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"mesh axis {name}={n!r} must be a positive integer")
    devices = list(jax.local_devices() if devices is None else devices)
    need = data * model * seq
    if need > len(devices):
        raise ValueError(f"a mesh of data={data} x model={model} x seq={seq} needs {need} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.array(devices[:need]).reshape(data, model, seq), MESH_AXES)


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    spec = []
    for name, size in zip(axes, shape):
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to jinfer.runtime.sharding.RULES")
        mesh_axis = RULES[name]
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]):
            mesh_axis = None  # nothing to split, or it does not split evenly: replicate
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings with the structure of the params pytree."""
    from jinfer.models import llama

    axes, shapes = llama.param_axes(config), llama.param_shapes(config)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731 - tuples of names are leaves here
    return jax.tree_util.tree_map(lambda a, s: NamedSharding(mesh, partition_spec(a, s, mesh)), axes, shapes,
                                  is_leaf=is_axes)


def kv_cache_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Of a KV pool's pages ([L, K, P, page_size, H]) or of a quantized pool's scales ([L, K, P, page_size]):
    both split over KV heads, so a device's scales sit with its pages."""
    axes = {len(KV_CACHE_AXES): KV_CACHE_AXES, len(KV_SCALE_AXES): KV_SCALE_AXES}.get(len(shape))
    if axes is None:
        raise ValueError(f"a KV pool array has shape [L, K, P, page_size, H] or (scales) [L, K, P, page_size]; "
                         f"got {tuple(shape)}")
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def kv_import_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """K/V of a prompt prefix computed outside the engine, split over KV heads like the cache it joins."""
    return NamedSharding(mesh, partition_spec(KV_IMPORT_AXES, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """Places each leaf on the mesh by the rules. Each device receives only its own shard, and the mesh may
    span hosts (every process passes the same host values; each places the shards of its own devices).
    A quantized weight (QTensor) splits its values like the float weight and its scales over their output
    axes (the groups of inputs, `quant_groups`, stay whole), and any per-input scale over its input axes."""
    from jinfer.models import llama

    def place_array(x, axes):
        host = np.asarray(x)
        s = NamedSharding(mesh, partition_spec(axes, host.shape, mesh))
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    def place(x, axes):
        if not is_qtensor(x):
            return place_array(x, axes)
        n_out_axes = axes[len(axes) - x.n_out:]
        group_axes = axes[:len(axes) - x.n_in - x.n_out] + ("quant_groups",) + n_out_axes
        input_axes = axes[:len(axes) - x.n_out]  # input_scale: split like the activation it divides
        fields = {f: None if getattr(x, f) is None else place_array(getattr(x, f), a)
                  for f, a in (("values", axes), ("scale", group_axes), ("offset", group_axes),
                               ("input_scale", input_axes))}
        return dataclasses.replace(x, **fields)

    return jax.tree_util.tree_map(place, params, llama.param_axes(config), is_leaf=is_qtensor)
