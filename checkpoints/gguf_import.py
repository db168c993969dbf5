"""Import a llama.cpp GGUF file into jinfer's params pytree (see `jinfer.models.llama`).

The `gguf` package parses the file and dequantizes every block type it knows (F32, F16, BF16, Q8_0,
Q4_0/1, Q5_0/1, Q2_K..Q6_K, ...); this module maps GGUF metadata to a `ModelConfig`, GGUF tensor names to
our layout, and undoes llama.cpp's row permutation of Q and K (its converter interleaves the two rotary
halves of each head for the GPT-J style RoPE kernel; we use the HF half-split layout).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np

from jinfer.checkpoints import gguf_blocks
from jinfer.checkpoints.errors import CheckpointError
from jinfer.models.config import ConfigError, ModelConfig, RopeScaling
from jinfer.models.llama import param_shapes

# GGUF architectures whose tensor layout is the Llama one; llama.cpp permutes Q/K rows only for 'llama'.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


def open_gguf(path: str | os.PathLike):
    """Returns a `gguf.GGUFReader`; a missing, truncated or non-GGUF file raises CheckpointError."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError or struct errors on bad bytes
        raise CheckpointError(f"{path!r} is not a readable GGUF file (truncated or corrupt?): {e}") from e


def gguf_fields(reader) -> dict:
    """All metadata as plain Python values (strings, numbers, lists)."""
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field type this gguf version cannot decode; we never need those
            continue
    return out


def config_from_gguf_fields(fields: dict, path: str = "<gguf>") -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture={arch!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
        )

    def need(key):
        full = f"{arch}.{key}"
        if full not in fields:
            raise CheckpointError(f"{path}: GGUF metadata lacks {full!r}")
        return fields[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(fields.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // heads if heads else 0))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or ())
    rope_scaling = None
    kind = fields.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise CheckpointError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported")
        rope_scaling = RopeScaling("linear", float(fields[f"{arch}.rope.scaling.factor"]))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(need("feed_forward_length")),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=False,  # decided by the tensors present, below
            attention_bias=arch == "qwen2",
            max_position_embeddings=int(fields.get(f"{arch}.context_length", 4096)),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            architecture=arch,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [n_heads * head_dim, ...] from (head, pair, half) to (head, half, pair)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | os.PathLike, dtype=np.float32, progress: Callable | None = None, keep_blocks: bool = False):
    """Returns (config, params, fields): params as numpy arrays of `dtype` in jinfer's layout.

    `progress`, if given, wraps the iterable of tensors (e.g. `tqdm`). With `keep_blocks`, each layer matmul
    weight whose tensors are Q8_0, Q4_0 or Q4_1 in every layer stays in that format, as a QTensor
    (`gguf_blocks`); the rest is dequantized as usual.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    fields = gguf_fields(reader)
    config = config_from_gguf_fields(fields, path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported yet")
    tied = "output.weight" not in tensors
    config = _replace(config, tie_word_embeddings=tied)
    shapes = param_shapes(config)
    c = config
    permute = c.architecture == "llama"

    def read(name: str, expect: tuple[int, ...]) -> np.ndarray:
        import gguf

        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which cannot be dequantized: {e}") from e
        w = np.asarray(w, dtype=np.float32)
        # GGUF stores dims innermost-first; the reader hands back rows-major, so torch's [out, in].
        if w.shape != expect:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {w.shape}, expected {expect}")
        return w

    N, K, H, D, V = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.vocab_size
    layers = {k: np.empty(s, dtype) for k, s in shapes["layers"].items()}
    per_layer: list[tuple[str, str, tuple, Callable]] = [
        ("attn_norm", "attn_norm.weight", (D,), lambda w: w),
        ("mlp_norm", "ffn_norm.weight", (D,), lambda w: w),
    ]
    matmuls = _matmul_layout(c, permute)
    for key, (suffix, out_fn, in_shape, out_shape) in matmuls.items():
        per_layer.append((key, suffix, (int(np.prod(out_shape)), int(np.prod(in_shape))),
                          functools.partial(gguf_blocks.to_layout, out_fn=out_fn, in_shape=in_shape,
                                            out_shape=out_shape)))
    if c.attention_bias:
        per_layer += [
            ("bq", "attn_q.bias", (N * H,), lambda w: (_unpermute_rows(w, N) if permute else w).reshape(N, H)),
            ("bk", "attn_k.bias", (K * H,), lambda w: (_unpermute_rows(w, K) if permute else w).reshape(K, H)),
            ("bv", "attn_v.bias", (K * H,), lambda w: w.reshape(K, H)),
        ]
    if keep_blocks:
        kept = _kept_blocks(tensors, matmuls, c.num_layers, path)
        per_layer = [job for job in per_layer if job[0] not in kept]
        layers.update(kept)
    jobs = [(i, key, f"blk.{i}.{suffix}", shape, fn) for i in range(c.num_layers) for key, suffix, shape, fn in per_layer]
    params = {"embed": None, "layers": layers, "final_norm": None}
    top = [("embed", "token_embd.weight", (V, D), lambda w: w), ("final_norm", "output_norm.weight", (D,), lambda w: w)]
    if not tied:
        top.append(("lm_head", "output.weight", (V, D), lambda w: w.T))
    iterable = [(None, *job) for job in top] + jobs
    for item in (progress(iterable) if progress else iterable):
        if item[0] is None:
            _, key, name, shape, fn = item
            params[key] = np.ascontiguousarray(fn(read(name, shape))).astype(dtype)
        else:
            i, key, name, shape, fn = item
            layers[key][i] = fn(read(name, shape))
    return config, params, fields


def _matmul_layout(c: ModelConfig, permute: bool) -> dict:
    """{weight name: (GGUF suffix, row reordering, input shape, output shape)}: a GGUF matrix is [out rows,
    inputs]; jinfer's weight is [*in, *out], its rows reordered back from llama.cpp's Q/K permutation."""
    N, K, H, D, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    keep = lambda a: a  # noqa: E731
    return {
        "wq": ("attn_q.weight", (lambda a: _unpermute_rows(a, N)) if permute else keep, (D,), (N, H)),
        "wk": ("attn_k.weight", (lambda a: _unpermute_rows(a, K)) if permute else keep, (D,), (K, H)),
        "wv": ("attn_v.weight", keep, (D,), (K, H)),
        "wo": ("attn_output.weight", keep, (N, H), (D,)),
        "w_gate": ("ffn_gate.weight", keep, (D,), (F,)),
        "w_up": ("ffn_up.weight", keep, (D,), (F,)),
        "w_down": ("ffn_down.weight", keep, (F,), (D,)),
    }


def _kept_blocks(tensors: dict, layout: dict, num_layers: int, path: str) -> dict:
    """{weight name: stacked QTensor} for the layer matmul weights (`_matmul_layout`) stored in one kept block
    type throughout."""
    out = {}
    for key, (suffix, out_fn, in_shape, out_shape) in layout.items():
        ts = [tensors.get(f"blk.{i}.{suffix}") for i in range(num_layers)]
        types = {t.tensor_type.name for t in ts if t is not None}
        if None in ts or len(types) != 1 or next(iter(types)) not in gguf_blocks.KEPT_TYPES:
            continue  # missing (the float path reports it) or not one kept type: dequantized instead
        rows, cols = int(np.prod(out_shape)), int(np.prod(in_shape))
        parts = []
        for t in ts:
            try:
                q, scale, offset = gguf_blocks.read_blocks(t.data, t.tensor_type.name, rows, cols)
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) does not hold "
                                      f"[{rows}, {cols}] in blocks: {e}") from e
            parts.append(gguf_blocks.to_qtensor(q, scale, offset, out_fn, in_shape, out_shape))
        out[key] = gguf_blocks.stack(parts)
    return out


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)
