"""Calibration: a model run layer by layer over calibration text, every matmul weight quantized from the
inputs it actually sees, those inputs produced by the layers (and parts of the layer) quantized before it.

The model describes its layer as a few stages (`CalibrationModel`; the Llama family's is
`jinfer.models.calibration.llama_calibration`): each stage computes the input shared by some of the layer's
matmul weights, using the layer's weights of the earlier stages as already quantized (GPTQ's "true
sequential" order: q/k/v, then o, then gate/up, then down), so each weight's quantization sees, and can
compensate, the error of everything before it. This module knows no model: jinfer.quant sits below
jinfer.models, so the model hands its stages in, as it hands `MATMUL_INPUT_AXES` to `quantize_params`.

Memory: one layer's float weights at a time are sliced out; the calibration activations of every sequence
are kept for the current stage only (SmolLM2-135M, 4096 tokens: the widest, w_down's input, 4096 x 1536 f32 =
25 MB), and the stages run over a few sequences at a time so dense attention's [T, T] scores stay small.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.quant.qtensor import QTensor, is_qtensor

# (float weight [*in, *out], its calibration inputs f32[tokens, prod(in)], n_in) -> the quantized weight
QuantizeWeight = Callable[[jax.Array, jax.Array, int], QTensor]
Progress = Callable[[int, int], None]  # (layers done, layers in all)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A part of the layer: `run(layer_params, carry) -> (x, carry)`, x [B, T, *in] the input of `weights`,
    computed with the weights of the earlier stages (quantized by then). Every leaf of carry has the
    sequences on its leading axis."""

    weights: tuple[str, ...]
    run: Callable


@dataclasses.dataclass(frozen=True)
class CalibrationModel:
    """How to run a model's layers stage by stage without a KV cache (dense causal attention)."""

    embed: Callable  # (params, tokens i32[B, T]) -> carry: the first layer's input
    stages: tuple[Stage, ...]
    finish: Callable  # (layer_params, carry after the last stage) -> carry: the next layer's input
    input_axes: dict[str, int]  # matmul weight -> contracted axes (e.g. llama.MATMUL_INPUT_AXES)


def pad_sequences(sequences: Sequence, rows_per_call: int) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences -> (i32[B, T] right-padded with 0, bool[B, T] real tokens), B rounded up to a multiple
    of rows_per_call (extra rows all padding), so every call of a stage has one shape and compiles once.
    Right padding changes no real token's activations: attention is causal."""
    if len(sequences) == 0:
        raise ValueError("calibration_tokens is empty: give at least one sequence of token ids")
    seqs = [np.asarray(s) for s in sequences]
    for i, s in enumerate(seqs):
        if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"calibration_tokens[{i}] must be a non-empty 1-D array of integer token ids; got "
                             f"shape {s.shape}, dtype {s.dtype}")
    T = max(len(s) for s in seqs)
    B = -(-len(seqs) // rows_per_call) * rows_per_call
    tokens = np.zeros((B, T), np.int32)
    valid = np.zeros((B, T), bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], valid[i, :len(s)] = s, True
    return tokens, valid


def _in_chunks(fn, p, carry, rows: int):
    """fn(p, carry) over `rows` sequences at a time, the results concatenated along the sequences."""
    n = jax.tree_util.tree_leaves(carry)[0].shape[0]
    outs = [fn(p, jax.tree_util.tree_map(lambda a, i=i: a[i:i + rows], carry)) for i in range(0, n, rows)]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *outs)


def stack_layers(per_layer: Sequence[QTensor]) -> QTensor:
    """One QTensor per layer (no stacked axis) -> one QTensor with the layers stacked in front of every field;
    the static fields must agree (the tree structures would differ otherwise)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer)


def calibrate_layers(params: dict, model: CalibrationModel, sequences: Sequence, quantize_weight: QuantizeWeight,
                     progress: Progress | None = None, rows_per_call: int = 4) -> dict:
    """The params with every layer matmul weight of `model.input_axes` replaced by
    `quantize_weight(w, x, n_in)`, x its inputs on the calibration sequences (padding dropped), layer after
    layer and stage after stage (each input computed with everything before it quantized)."""
    tokens, valid = pad_sequences(sequences, rows_per_call)
    keep = jnp.asarray(np.flatnonzero(valid.reshape(-1)))  # the rows of [B * T] that are real tokens
    stacked = params["layers"]
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    run = [jax.jit(s.run) for s in model.stages]
    finish = jax.jit(model.finish)
    embed = jax.jit(model.embed)
    carry = jnp.concatenate([embed(params, jnp.asarray(tokens[i:i + rows_per_call]))
                             for i in range(0, len(tokens), rows_per_call)])
    done: dict[str, list[QTensor]] = {}
    for layer in range(num_layers):
        p = {k: jax.tree_util.tree_map(lambda a: a[layer], v) for k, v in stacked.items()}
        for stage, fn in zip(model.stages, run):
            x, carry = _in_chunks(fn, p, carry, rows_per_call)
            x = x.reshape(-1, int(np.prod(x.shape[2:])))[keep].astype(jnp.float32)  # [tokens, prod(in)]
            for name in stage.weights:
                if name in p and name in model.input_axes and not is_qtensor(p[name]):
                    p[name] = quantize_weight(p[name], x, model.input_axes[name])
                    done.setdefault(name, []).append(p[name])
            del x
        carry = _in_chunks(finish, p, carry, rows_per_call)
        if progress is not None:
            progress(layer + 1, num_layers)
    return {**params, "layers": {**stacked, **{name: stack_layers(qts) for name, qts in done.items()}}}
