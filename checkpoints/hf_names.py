"""The one mapping between jinfer's params pytree and Hugging Face Llama/Mistral/Qwen2 tensors.

`hf_tensors(config)` lists every HF tensor of a model as an `HFTensor`: its HF name and shape, the leaf of
jinfer's pytree it belongs to (and the layer, since jinfer stacks layers on the leading axis of a leaf),
and two functions that convert one tensor each way. Importers and savers iterate this list and never
spell a tensor name or a transpose themselves.

Layouts: torch `Linear.weight` is [out, in]; jinfer keeps [in, out] with the head axes split out, so
q_proj [N*H, D] <-> wq [D, N, H] and o_proj [D, N*H] <-> wo [N, H, D]. HF Llama applies RoPE to the two
halves of each head (rotate_half), as jinfer does, so Q and K rows need no permutation (unlike GGUF).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jinfer.models.config import ModelConfig
from jinfer.models.llama import param_shapes


@dataclasses.dataclass(frozen=True)
class HFTensor:
    hf_name: str  # e.g. "model.layers.3.self_attn.q_proj.weight"
    hf_shape: tuple[int, ...]
    leaf: tuple[str, ...]  # key path into jinfer's params, e.g. ("layers", "wq")
    layer: int | None  # index along the leaf's leading (stacked-layers) axis; None for unstacked leaves
    shape: tuple[int, ...]  # jinfer's shape of this tensor: the leaf's shape without the layer axis
    transposed: bool  # torch Linear weight: HF [out, in] is jinfer [in, out] with the axes reshaped

    def to_jinfer(self, t: np.ndarray) -> np.ndarray:
        """HF tensor [hf_shape] -> jinfer [shape] (a view where the layouts allow it)."""
        return (t.T if self.transposed else t).reshape(self.shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """jinfer [shape] -> HF tensor [hf_shape], C-contiguous as safetensors needs."""
        w = np.asarray(w)
        if self.transposed:
            return np.ascontiguousarray(w.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(w.reshape(self.hf_shape))


def _layer_table(c: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """leaf name -> (HF name within `model.layers.{i}.`, HF shape, transposed)."""
    D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return {
        "attn_norm": ("input_layernorm.weight", (D,), False),
        "wq": ("self_attn.q_proj.weight", (N * H, D), True),
        "wk": ("self_attn.k_proj.weight", (K * H, D), True),
        "wv": ("self_attn.v_proj.weight", (K * H, D), True),
        "wo": ("self_attn.o_proj.weight", (D, N * H), True),
        "bq": ("self_attn.q_proj.bias", (N * H,), False),
        "bk": ("self_attn.k_proj.bias", (K * H,), False),
        "bv": ("self_attn.v_proj.bias", (K * H,), False),
        "mlp_norm": ("post_attention_layernorm.weight", (D,), False),
        "w_gate": ("mlp.gate_proj.weight", (F, D), True),
        "w_up": ("mlp.up_proj.weight", (F, D), True),
        "w_down": ("mlp.down_proj.weight", (D, F), True),
    }


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """Every HF tensor of the model, in file order (embeddings, layer by layer, final norm, lm_head).

    A tied model has no `lm_head.weight`; a model without attention_bias has no q/k/v biases.
    """
    c = config
    shapes = param_shapes(c)
    V, D = c.vocab_size, c.hidden_size
    out = [HFTensor("model.embed_tokens.weight", (V, D), ("embed",), None, (V, D), False)]
    table = _layer_table(c)
    for i in range(c.num_layers):
        for leaf, (suffix, hf_shape, transposed) in table.items():
            if leaf in shapes["layers"]:
                out.append(HFTensor(f"model.layers.{i}.{suffix}", hf_shape, ("layers", leaf), i,
                                    shapes["layers"][leaf][1:], transposed))
    out.append(HFTensor("model.norm.weight", (D,), ("final_norm",), None, (D,), False))
    if "lm_head" in shapes:
        out.append(HFTensor("lm_head.weight", (V, D), ("lm_head",), None, (D, V), True))
    return out


def get_leaf(params: dict, leaf: tuple[str, ...]):
    for key in leaf:
        params = params[key]
    return params
