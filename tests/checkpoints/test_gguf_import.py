"""The GGUF importer on synthetic files of every block type, against transformers' own GGUF loader
(which dequantizes with its own torch code), and its errors on malformed files.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.gguf_import import load_gguf
from jinfer.checkpoints.load import load
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.runtime import reference
from tests.checkpoints.gguf_writer import write_llama_gguf

CONFIG = ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                     intermediate_size=512, max_position_embeddings=128, bos_token_id=0, eos_token_ids=(1,))


@pytest.fixture(scope="module")
def random_params():
    return jax.tree_util.tree_map(np.asarray, llama.init_params(CONFIG, jax.random.key(0)))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_logits_match_transformers_for_each_block_type(tmp_path, random_params, qtype):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"model-{qtype.name}.gguf"
    write_llama_gguf(path, CONFIG, random_params, qtype)
    config, params, _ = load_gguf(path)
    # GGUF stores the epsilon as float32.
    assert dataclasses.replace(config, rms_norm_eps=CONFIG.rms_norm_eps) == CONFIG
    assert config.rms_norm_eps == pytest.approx(CONFIG.rms_norm_eps, rel=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, CONFIG.vocab_size, 24)]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = reference.full_logits(jax.tree_util.tree_map(jnp.asarray, params), config, ids)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_f32_file_reproduces_the_params_exactly(tmp_path, random_params):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, CONFIG, random_params, Q.F32)
    _, params, _ = load_gguf(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, random_params)


def test_tied_embeddings_when_output_tensor_absent(tmp_path, random_params):
    tied = {k: v for k, v in random_params.items() if k != "lm_head"}
    cfg = ModelConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    path = tmp_path / "tied.gguf"
    write_llama_gguf(path, cfg, tied, Q.F32)
    config, params, _ = load_gguf(path)
    assert config.tie_word_embeddings and "lm_head" not in params


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_truncated_file(tmp_path, random_params):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, CONFIG, random_params, Q.Q8_0)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut"):
            load_gguf(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(CheckpointError, match="not a GGUF"):
        load(bad)


def test_unsupported_architecture(tmp_path, random_params):
    path = tmp_path / "falcon.gguf"
    write_llama_gguf(path, CONFIG, random_params, Q.F32, arch="falcon")
    with pytest.raises(CheckpointError, match="general.architecture='falcon'"):
        load_gguf(path)


def test_missing_tensor(tmp_path, random_params):
    params = {**random_params, "layers": dict(random_params["layers"])}
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, CONFIG, params, Q.F32)
    # Rename one tensor in place (same length), so the file stays well-formed but lacks it.
    data = path.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        load_gguf(path)


def test_bad_head_counts_name_the_field(tmp_path, random_params, monkeypatch):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, CONFIG, random_params, Q.F32)
    import jinfer.checkpoints.gguf_import as gi

    real = gi.gguf_fields
    monkeypatch.setattr(gi, "gguf_fields", lambda r: {**real(r), "llama.attention.head_count_kv": 3})
    with pytest.raises(CheckpointError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        load_gguf(path)
