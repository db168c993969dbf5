"""ModelConfig from HF config dicts: fields, round trip, and errors that name the field."""

from __future__ import annotations

import pytest

from jinfer.models.config import ConfigError, ModelConfig, RopeScaling

LLAMA31 = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def test_llama31_fields():
    c = ModelConfig.from_hf_config(LLAMA31)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.q_per_kv) == (32, 8, 128, 4)
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert ModelConfig.from_hf_config(c.to_hf_config()) == c


def test_qwen2_has_attention_bias_by_model_type():
    cfg = {**LLAMA31, "model_type": "qwen2", "rope_scaling": None}
    assert ModelConfig.from_hf_config(cfg).attention_bias


@pytest.mark.parametrize("change, field", [
    ({"num_key_value_heads": 5}, "num_kv_heads=5"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_attention_heads": -1}, "num_attention_heads"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"eos_token_id": 10**6}, "eos_token_ids"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf_config({**LLAMA31, **change})


def test_missing_field():
    cfg = dict(LLAMA31)
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf_config(cfg)
