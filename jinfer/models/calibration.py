"""The Llama layer cut into the stages calibrated quantization runs in turn (jinfer.quant.calibration):
without a KV cache, dense causal attention over each whole calibration sequence.

    q/k/v  <- rms_norm(x)            (attn_norm)
    o      <- attention(q, k, v)      with q/k/v's weights as quantized
    gate/up <- rms_norm(x + o(...))   (mlp_norm)
    down   <- silu(gate) * up
    next x  = x + down(...)

The pieces are the model's own (`llama._qkv`, `llama._out`, rms_norm, apply_rope, gqa_attention), so a
stage computes what `llama.forward` does; only the MLP is spelled out, since w_down's input is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.models import llama
from jinfer.models.attention import gqa_attention
from jinfer.models.config import ModelConfig
from jinfer.models.layers import apply_rope, rms_norm, rope_inv_freq
from jinfer.quant.calibration import CalibrationModel, Stage
from jinfer.quant.qtensor import qeinsum


def llama_calibration(config: ModelConfig) -> CalibrationModel:
    c = config
    inv_freq = rope_inv_freq(c)

    def embed(params, tokens):  # i32[B, T] -> x [B, T, D]
        return params["embed"][tokens]

    def qkv_input(p, x):
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        return h, x

    def o_input(p, x):
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        q, k, v = llama._qkv(c, qeinsum, p, h)
        B, T = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        attn = gqa_attention(q, k, v, causal)  # [B, T, N, H]
        return attn, (x, attn)

    def mlp_input(p, carry):
        x, attn = carry
        x = x + llama._out(qeinsum, p, attn)
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        return h, (x, h)

    def down_input(p, carry):
        x, h = carry
        gate = qeinsum("BTD,DF->BTF", h, p["w_gate"])
        up = qeinsum("BTD,DF->BTF", h, p["w_up"])
        a = jax.nn.silu(gate) * up
        return a, (x, a)

    def finish(p, carry):
        x, a = carry
        return x + qeinsum("BTF,FD->BTD", a, p["w_down"])

    stages = (Stage(("wq", "wk", "wv"), qkv_input), Stage(("wo",), o_input),
              Stage(("w_gate", "w_up"), mlp_input), Stage(("w_down",), down_input))
    return CalibrationModel(embed, stages, finish, dict(llama.MATMUL_INPUT_AXES))
