"""The Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) as pure functions over a params pytree.

Params (layers stacked on a leading axis L, run with `lax.scan` so compile time does not grow with depth):

    embed       [V, D]
    layers:
      attn_norm [L, D]        wq [L, D, N, H]    wk, wv [L, D, K, H]    wo [L, N, H, D]
      bq [L, N, H], bk, bv [L, K, H]             (only when config.attention_bias)
      mlp_norm  [L, D]        w_gate, w_up [L, D, F]                    w_down [L, F, D]
    final_norm  [D]
    lm_head     [D, V]        (absent when config.tie_word_embeddings)

`param_axes` gives the logical axis names of every leaf; the sharding table maps them to mesh axes.
`fuse_projections` concatenates the products that share an input (wqkv, w_gate_up), the engine's form on one
GPU; `fold_norms` then multiplies each layer's two RMSNorm gains into them (`forward` tells the form by the gains'
absence). `forward` also takes `layers` as a tuple of L per-layer dicts of the same leaves without the L axis
(`unstack_layers`), the engine's form on the CPU, where a scanned slice of a stacked weight is a copy.
The KV cache goes in and comes back out of `forward`; how it is laid out and read is the business of the
attention backend passed in (`jinfer.models.attention`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models.config import ModelConfig
from jinfer.models.layers import rms_norm, rope_inv_freq, scale_rows, swiglu
from jinfer.quant.qtensor import LayerSlice, concat_outputs, is_qtensor, qeinsum, times_input_gain

Params = dict


def param_shapes(config: ModelConfig) -> dict:
    """The params pytree with a shape tuple at every leaf."""
    c = config
    V, D, L, N, K, H, F = (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
                           c.num_kv_heads, c.head_dim, c.intermediate_size)
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, N, H),
        "wk": (L, D, K, H),
        "wv": (L, D, K, H),
        "wo": (L, N, H, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if c.attention_bias:
        layers.update(bq=(L, N, H), bk=(L, K, H), bv=(L, K, H))
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


_LAYER_AXES = {
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "q_heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "q_heads", "head_dim", "embed"),
    "bq": ("layers", "q_heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "mlp_norm": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}


# The matmul weights of a layer and how many of their leading axes (after L) the matmul contracts: what a
# quantized format groups and scales over (jinfer.quant).
MATMUL_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}

# Weights that read the same input, concatenated by `fuse_projections` on their output axis (the heads, F),
# and the contracted axes of the fused weights (quantizing fused params takes MATMUL_INPUT_AXES | FUSED_INPUT_AXES).
FUSED = {"wqkv": (("wq", "wk", "wv"), -2), "w_gate_up": (("w_gate", "w_up"), -1)}
FUSED_INPUT_AXES = {name: MATMUL_INPUT_AXES[parts[0]] for name, (parts, _) in FUSED.items()}


def fuse_projections(params: Params) -> Params:
    """The same model with wq, wk, wv as one `wqkv` [L, D, N + 2K, H] and w_gate, w_up as one `w_gate_up`
    [L, D, 2F] (stacked or per-layer), which `forward` reads as one product each.

    Why (the H200, Llama-3.1-8B shape, batch-1 decode; benchmarks/RESULTS.md): every product is a kernel
    launch and a small K or V product reads well below the device's bandwidth, so five GEMVs a layer become
    two. Quantized leaves fuse too where they are alike (`qtensor.concat_outputs`: each output keeps its
    checkpoint's numbers, e.g. a GGUF file's blocks); a mix of formats stays apart. Only where the model is
    not sharded: a fused output axis would no longer split by head over a mesh."""
    def fuse(d: dict) -> dict:
        out = dict(d)
        for name, (parts, axis) in FUSED.items():
            if not all(p in d for p in parts):
                continue
            ws = [d[p] for p in parts]
            if not any(map(is_qtensor, ws)):
                fused = jnp.concatenate(ws, axis=axis)
            else:
                fused = concat_outputs(ws, axis) if all(map(is_qtensor, ws)) else None
            if fused is not None:
                for p in parts:
                    out.pop(p)
                out[name] = fused
        return out

    layers = params["layers"]
    return {**params, "layers": fuse(layers) if isinstance(layers, dict) else tuple(map(fuse, layers))}


def fold_norms(params: Params) -> Params:
    """The fused model (`fuse_projections`) with each layer's RMSNorm gains multiplied into the products after
    them (attn_norm into wqkv, mlp_norm into w_gate_up) and dropped: RMSNorm(x) @ W is x @ (gain * W) times
    x's norm factor, a scalar a token, which `forward` leaves to what reads the product (the attention, the
    gated activation: `ModelOps.swiglu`). A float product is computed in float32 and rounded once to the
    weight's dtype; a quantized one keeps its stored numbers and takes the gain as an input scale
    (`qtensor.times_input_gain`: x times the gain on its way in). Layers it cannot fold stay as they are:
    unfused weights, biased q/k/v (the bias is added after the factor).

    Why (the H200, Llama-3.1-8B shape, batch-1 decode; benchmarks/RESULTS.md, session 36): each of a layer's
    two norms was a kernel launch of ~1.9 us for 8 kB, between two products; folded, the attention kernel and the
    gated activation's kernel each reduce their token's row themselves, and a layer launches two kernels fewer.
    Why not round a quantized weight with the gain in it: a gain's outlier channels then set the scale of every
    weight in their groups (SmolLM2, RESULTS.md session 37: int4 g128 perplexity +203% over float32, against
    +58.5%)."""
    def fold(d: dict) -> dict:
        pairs = (("attn_norm", "wqkv"), ("mlp_norm", "w_gate_up"))
        if any(g not in d or w not in d for g, w in pairs) or "bq" in d:
            return d
        out = {k: w for k, w in d.items() if k not in NORMS}
        for g, w in pairs:
            out[w] = times_input_gain(d[w], d[g]) if is_qtensor(d[w]) else _times_gain(d[w], d[g])
        return out

    layers = params["layers"]
    return {**params, "layers": fold(layers) if isinstance(layers, dict) else tuple(map(fold, layers))}


@jax.jit
def _times_gain(w: jnp.ndarray, gain: jnp.ndarray) -> jnp.ndarray:
    """w [..., D, *out] times gain [..., D] over its input axis D, in float32 rounded once; one fused pass (no
    float32 copy of an 8B model's stacked gate/up weight on the device)."""
    gain = gain.astype(jnp.float32).reshape(*gain.shape, *(1,) * (w.ndim - gain.ndim))
    return (w.astype(jnp.float32) * gain).astype(w.dtype)


def is_folded(params: Params) -> bool:
    """Whether `fold_norms` folded params' layer norms into their products."""
    layers = params["layers"]
    return "attn_norm" not in (layers if isinstance(layers, dict) else layers[0])


def param_axes(config: ModelConfig) -> dict:
    """The params pytree with a tuple of logical axis names at every leaf (same structure as params)."""
    shapes = param_shapes(config)
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {k: _LAYER_AXES[k] for k in shapes["layers"]},
        "final_norm": ("embed",),
    }
    if "lm_head" in shapes:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights of the right shapes and scales (for tests and benchmarks of real-shaped models)."""
    c = config
    # Each matmul weight is scaled by 1/sqrt(fan-in) so activations keep unit scale through depth.
    fan_in = {"wq": c.hidden_size, "wk": c.hidden_size, "wv": c.hidden_size, "wo": c.num_heads * c.head_dim,
              "w_gate": c.hidden_size, "w_up": c.hidden_size, "w_down": c.intermediate_size,
              "lm_head": c.hidden_size, "embed": 1.0, "bq": 400.0, "bk": 400.0, "bv": 400.0}
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(c), is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        noise = jax.random.normal(k, shape, jnp.float32)
        leaves.append(1.0 + 0.1 * noise if name.endswith("norm") else noise * fan_in[name] ** -0.5)
    return jax.tree_util.tree_unflatten(treedef, [x.astype(dtype) for x in leaves])


AttentionFn = Callable[..., tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]
NORMS = ("attn_norm", "mlp_norm")  # a layer's RMSNorm gains
MatmulFn = Callable[[str, jnp.ndarray, object], jnp.ndarray]  # (einsum spec, x, weight | QTensor | LayerSlice)
NormFn = Callable[..., jnp.ndarray]  # (x, gain [D] or stacked [L, D], eps, layer=None) -> RMSNorm of x
SwigluFn = Callable[..., jnp.ndarray]  # (gate_up [..., 2F], x [..., D] | None, eps) -> [..., F] (`layers.swiglu`)
#   With `ModelOps.split_parts` and x given, gate_up may also be a split-K product's partials [S, ..., 2F], to sum
#   (`jinfer.runtime.ops.kernel_swiglu`; XLA's `layers.swiglu` takes no partials).


class ModelOps(NamedTuple):
    """How `forward` computes its products and norms: XLA's (`qeinsum`, `rms_norm`) by default, the runtime's
    kernels where they run natively and pay (`jinfer.runtime.ops`). The model reads the same either way."""

    matmul: MatmulFn = qeinsum  # (spec, x, w): a stacked quantized weight reaches it as a LayerSlice
    norm: NormFn = rms_norm  # a layer's gain reaches it stacked with the layer index, to read in place
    # Per-layer weights (`unstack_layers`) run as straight-line code, one copy of the layer a layer, instead
    # of a scan whose body picks the layer's weights with a `lax.switch`.
    unroll: bool = False
    swiglu: SwigluFn = swiglu  # the fused gate/up product's activation, scaled by x's norm factor where folded
    # The runner fuses the products that share an input (`fuse_projections`) for these ops, and folds the norm
    # gains into them (`fold_norms`: a float weight's numbers, a quantized one's input scale): worth it where the
    # norm factor costs no launch of its own (the attention's kernels and `swiglu` reduce the row themselves).
    fuse: bool = False
    fold_norms: bool = False
    # With folded norms, the gate/up product is asked for its split-K partials unsummed (`matmul(..., parts=True)`)
    # and `swiglu` sums them: a quantized product's sum would otherwise be an XLA launch of its own before the
    # activation's kernel (on one GPU, int4 at batch 1: a kernel a layer).
    split_parts: bool = False


def forward(
    params: Params,
    tokens: jnp.ndarray,  # i32[B, T]
    positions: jnp.ndarray,  # i32[B, T]
    kv_cache: tuple[jnp.ndarray, jnp.ndarray],  # (k, v), each [L, ...] as the attention backend lays it out
    attn_meta,  # per-step metadata for `attention`; opaque to the model
    *,
    config: ModelConfig,
    attention: AttentionFn,
    num_layers: int | None = None,
    ops: ModelOps = ModelOps(),
) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    """Runs the decoder; returns the final-normed hidden states [B, T, D] and the updated cache.
    `num_layers`: run only the first that many layers (then the final norm): an early-exit draft, which
    writes the K/V of those layers only. `ops`: every weight's product and every norm (XLA's, or the
    runtime's choice per platform, `jinfer.runtime.ops`); a stacked quantized weight reaches `ops.matmul` as a
    `LayerSlice` and a layer's norm gain reaches `ops.norm` stacked with the layer index, so a kernel can read
    the layer in place where the scan would copy it out.

    `attention(q, k, v, k_cache, v_cache, layer, positions, attn_meta, inv_freq) -> (out, k_cache, v_cache)`
    rotates q and k by RoPE at `positions` (`inv_freq`: the rotary frequencies, as `apply_rope` takes them),
    writes the new K/V of `layer` into the stacked caches and attends; q: [B, T, N, H], k/v: [B, T, K, H]. The
    rotation is the attention's so that a backend can fuse it with the K/V write (`jinfer.kernels.rope_kv`).
    With folded norms (`fold_norms`), an attention callable whose attribute `scales_rows` is true also takes
    `rows=(x, eps)`: q, k and v are yet to be multiplied by the RMSNorm factor of x [B, T, D] token by token
    (`layers.scale_rows`), before the rotation; to any other callable the model hands them scaled.
    The whole cache rides in the scan carry (not sliced per layer as scan inputs/outputs), so XLA updates
    it in place instead of copying every layer's cache on every step.
    """
    c = config
    inv_freq = rope_inv_freq(c)
    x = params["embed"][tokens]  # [B, T, D]
    n = c.num_layers if num_layers is None else num_layers
    matmul, eps = ops.matmul, c.rms_norm_eps
    folded = is_folded(params)
    mlp = functools.partial(_mlp, matmul, functools.partial(ops.swiglu, eps=eps), ops.split_parts)

    def run_layer(x, k_cache, v_cache, i, norm, project):
        """One decoder layer: `norm(x, name)` is its RMSNorm with gain `name`, `project(fn, *args)` calls fn with
        its weights first. Folded (`fold_norms`), the products read x itself, and their readers scale each
        token's row by x's norm factor: the attention where it says it can (`attention.scales_rows`)."""
        q, k, v = project(functools.partial(_qkv, c, matmul), x if folded else norm(x, "attn_norm"))
        rows = {}
        if folded and getattr(attention, "scales_rows", False):
            rows = {"rows": (x, eps)}
        elif folded:
            q, k, v = (scale_rows(t, x, eps) for t in (q, k, v))
        attn, k_cache, v_cache = attention(q, k, v, k_cache, v_cache, i, positions, attn_meta, inv_freq, **rows)
        x = x + project(functools.partial(_out, matmul), attn)
        h = project(mlp, x, x) if folded else project(mlp, norm(x, "mlp_norm"), None)
        return x + h, k_cache, v_cache

    if isinstance(params["layers"], tuple) and ops.unroll:
        # Straight-line code over per-layer weights: no loop, so no loop counter (on one GPU a scan launches a
        # kernel a layer for it) and every layer index a constant.
        for i, w in enumerate(params["layers"][:n]):
            x, *kv_cache = run_layer(x, *kv_cache, i, lambda x, name, w=w: ops.norm(x, w[name], eps),
                                     lambda fn, *args, w=w: fn(w, *args))
        return ops.norm(x, params["final_norm"], eps), tuple(kv_cache)
    if isinstance(params["layers"], dict):  # stacked: each scan step slices its layer out of every float leaf
        # The quantized weights and the norm gains stay whole, reached with the layer index.
        held = {k: w for k, w in params["layers"].items() if is_qtensor(w)}
        norms = {k: params["layers"][k] for k in NORMS if not folded}
        xs = {k: w for k, w in params["layers"].items() if k not in held and k not in norms}
        xs = xs if n == c.num_layers else jax.tree_util.tree_map(lambda w: w[:n], xs)

        def project(fn, p, i, *args):
            return fn({**p, **{k: LayerSlice(w, i) for k, w in held.items()}}, *args)
    else:  # one dict per layer (`unstack_layers`): only the small norm vectors are stacked
        per_layer = params["layers"][:n]
        xs = {}
        norms = {name: jnp.stack([w[name] for w in per_layer]) for name in NORMS if not folded}

        def project(fn, p, i, *args):
            return jax.lax.switch(i, [functools.partial(fn, w) for w in per_layer], *args)

    def layer(carry, p):
        x, k_cache, v_cache, i = carry
        x, k_cache, v_cache = run_layer(x, k_cache, v_cache, i,
                                        lambda x, name: ops.norm(x, norms[name], eps, layer=i),
                                        lambda fn, *args: project(fn, p, i, *args))
        return (x, k_cache, v_cache, i + 1), None

    # The layer index rides in the carry: scanned over as an input, each layer would launch a kernel to read it.
    (x, *kv_cache, _), _ = jax.lax.scan(layer, (x, *kv_cache, jnp.int32(0)), xs, length=n)
    return ops.norm(x, params["final_norm"], eps), tuple(kv_cache)


def _qkv(c: ModelConfig, matmul: MatmulFn, w, h):
    if "wqkv" in w:
        qkv = matmul("BTD,DNH->BTNH", h, w["wqkv"])
        q, k, v = jnp.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=2)
    else:
        q = matmul("BTD,DNH->BTNH", h, w["wq"])
        k = matmul("BTD,DKH->BTKH", h, w["wk"])
        v = matmul("BTD,DKH->BTKH", h, w["wv"])
    if c.attention_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    return q, k, v


def _out(matmul: MatmulFn, w, attn):
    return matmul("BTNH,NHD->BTD", attn, w["wo"])


def _mlp(matmul: MatmulFn, act: SwigluFn, split_parts: bool, w, h, x):
    """x: None, or (folded norms) h itself, the rows whose norm factor the activation applies."""
    if "w_gate_up" in w:
        parts = {"parts": True} if split_parts and x is not None else {}
        hidden = act(matmul("BTD,DF->BTF", h, w["w_gate_up"], **parts), x)
    else:
        gate = matmul("BTD,DF->BTF", h, w["w_gate"])
        up = matmul("BTD,DF->BTF", h, w["w_up"])
        hidden = jax.nn.silu(gate) * up
    return matmul("BTF,FD->BTD", hidden, w["w_down"])


def unstack_layers(params: Params) -> Params:
    """The same params with `layers` as a tuple of per-layer dicts, each leaf its own array. `forward` still
    scans the layers, but reaches each layer's matrices through a `lax.switch` on the layer index, whose
    branches read that layer's own buffers.

    Why (the 2-core CPU, XLA CPU, jax 0.10.2, SmolLM2-135M shapes, 30 layers; benchmarks/RESULTS.md): a
    scanned layer copies every weight's `dynamic-slice` out of the stacked array before its matmul, which
    at 1 row costs a quarter of the layer stack's time (20.8 ms scanned, 16.6 ms switched); slicing the
    stacked arrays statically inside the jitted function copies as well, so the split happens once, outside
    it. On GPUs the matmuls read the slices in place (`jinfer.runtime.xla_flags`) and the stacked form stays.
    """
    stacked = params["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda w, i=i: w[i], stacked) for i in range(n))
    return {**params, "layers": layers}


def logits_from_hidden(params: Params, h: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    """h: [..., D] -> f32[..., V]."""
    w, spec = (params["embed"], "MD,VD->MV") if config.tie_word_embeddings else (params["lm_head"], "MD,DV->MV")
    rows = h.reshape(-1, h.shape[-1])  # [M, D]
    pad = int(rows.shape[0] == 1 and h.dtype != jnp.float32)
    if pad:
        # XLA GPU lowers a one-row bf16 x bf16 -> f32 dot as an f32 GEMV over an f32 copy of the whole head
        # (Llama-3-8B on the H200: 1.26 ms a step, against 0.24 ms for two rows read by cuBLAS as bf16).
        rows = jnp.concatenate([rows, rows])
    logits = jnp.einsum(spec, rows, w, preferred_element_type=jnp.float32)
    return logits[:rows.shape[0] - pad].reshape(*h.shape[:-1], logits.shape[-1])


def num_params(config: ModelConfig) -> int:
    return int(sum(np.prod(s) for s in jax.tree_util.tree_leaves(
        param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))))
