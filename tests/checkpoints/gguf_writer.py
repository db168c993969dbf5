"""Writes small synthetic GGUF files the way llama.cpp's converter does (Q/K rows permuted for the
GPT-J style RoPE, 2-D weights quantized), for importer tests that need no real checkpoint.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from jinfer.models.config import ModelConfig

# Block layouts of the K-quants, which gguf-py can read but not write: (elements, bytes, fp16 field offsets).
_K_BLOCKS = {Q.Q4_K: (256, 144, (0, 2)), Q.Q6_K: (256, 210, (208,))}


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to HF q_proj/k_proj rows: (head, half, pair) -> (head, pair, half)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    w = np.ascontiguousarray(w, np.float32)
    if qtype in _K_BLOCKS:
        # No quantizer exists for these: write random valid blocks (small finite scales) instead of w.
        elems, nbytes, halves = _K_BLOCKS[qtype]
        rows, cols = w.shape
        blocks = rng.integers(0, 256, size=(rows, cols // elems, nbytes), dtype=np.uint8)
        for off in halves:
            scale = rng.uniform(2e-4, 1e-3, size=(rows, cols // elems)).astype(np.float16)
            blocks[..., off:off + 2] = scale.view(np.uint8).reshape(rows, cols // elems, 2)
        return blocks.reshape(rows, -1)
    if qtype == Q.BF16:
        return gguf.quants.quantize(w, qtype)
    return gguf.quants.quantize(w, qtype)


def write_llama_gguf(path, config: ModelConfig, params: dict, qtype: Q = Q.F32, seed: int = 0,
                     arch: str = "llama") -> None:
    """params: jinfer's layout (numpy). 2-D weights use `qtype`; norms stay F32 as llama.cpp keeps them."""
    c = config
    rng = np.random.default_rng(seed)
    N, K, H, D, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(H)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(qtype) if qtype in (Q.F32, Q.F16) else 1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name, arr, quantize=True):
        arr = np.asarray(arr, np.float32)
        t = qtype if quantize and arr.ndim == 2 else Q.F32
        data = _encode(arr, t, rng)
        w.add_tensor(name, data, raw_shape=arr.shape if t in (Q.F32,) else None, raw_dtype=t)

    L = params["layers"]
    add("token_embd.weight", params["embed"])
    add("output_norm.weight", params["final_norm"])
    if "lm_head" in params:
        add("output.weight", np.asarray(params["lm_head"]).T)
    for i in range(c.num_layers):
        q = np.asarray(L["wq"][i]).reshape(D, N * H).T
        k = np.asarray(L["wk"][i]).reshape(D, K * H).T
        add(f"blk.{i}.attn_norm.weight", L["attn_norm"][i])
        add(f"blk.{i}.attn_q.weight", llamacpp_permute(q, N) if arch == "llama" else q)
        add(f"blk.{i}.attn_k.weight", llamacpp_permute(k, K) if arch == "llama" else k)
        add(f"blk.{i}.attn_v.weight", np.asarray(L["wv"][i]).reshape(D, K * H).T)
        add(f"blk.{i}.attn_output.weight", np.asarray(L["wo"][i]).reshape(N * H, D).T)
        add(f"blk.{i}.ffn_norm.weight", L["mlp_norm"][i])
        add(f"blk.{i}.ffn_gate.weight", np.asarray(L["w_gate"][i]).T)
        add(f"blk.{i}.ffn_up.weight", np.asarray(L["w_up"][i]).T)
        add(f"blk.{i}.ffn_down.weight", np.asarray(L["w_down"][i]).T)
        if c.attention_bias:
            add(f"blk.{i}.attn_q.bias", np.asarray(L["bq"][i]).reshape(-1))
            add(f"blk.{i}.attn_k.bias", np.asarray(L["bk"][i]).reshape(-1))
            add(f"blk.{i}.attn_v.bias", np.asarray(L["bv"][i]).reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
