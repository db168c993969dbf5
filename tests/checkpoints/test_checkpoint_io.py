"""HF safetensors and orbax checkpoints: round trips, parity with transformers, and error reporting.

Parity is independent of our own loader: transformers reads the directory `save_hf_dir` wrote and runs its
own Llama/Mistral/Qwen2 in PyTorch float32, so agreement checks the tensor names, the transposes and head
reshapes of `checkpoints.hf_names`, and the config.json that `ModelConfig.to_hf_config` writes.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.orbax_io import restore_orbax, save_orbax, save_orbax_atomic
from jinfer.checkpoints.safetensors_io import load_hf_dir, save_hf_dir
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.models.config import ModelConfig, RopeScaling
from jinfer.models.llama import forward, init_params, logits_from_hidden

_BASE = dict(vocab_size=96, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=80,
             max_position_embeddings=128, rms_norm_eps=1e-5)
CONFIGS = {
    # GQA 4:1, untied lm_head.
    "llama_gqa": ModelConfig(**_BASE, num_heads=8, num_kv_heads=2, rope_theta=10000.0),
    # MHA, tied embeddings; original_max_position_embeddings is small so the head's wavelengths straddle
    # llama3's smoothing band and all three branches of the scaling are used.
    "llama3_scaled": ModelConfig(**_BASE, num_heads=4, num_kv_heads=4, rope_theta=500000.0, tie_word_embeddings=True,
                                 rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32)),
    "llama_linear": ModelConfig(**_BASE, num_heads=4, num_kv_heads=2, rope_scaling=RopeScaling("linear", 2.0)),
    "mistral": ModelConfig(**_BASE, num_heads=8, num_kv_heads=2, architecture="mistral"),
    # Q/K/V biases, tied embeddings, GQA 2:1, as the small Qwen2 models are.
    "qwen2": ModelConfig(**_BASE | {"rms_norm_eps": 1e-6}, num_heads=4, num_kv_heads=2, rope_theta=1000000.0,
                         tie_word_embeddings=True, attention_bias=True, architecture="qwen2"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _params(name: str, dtype=jnp.float32, seed: int = 0) -> dict:
    return init_params(CONFIGS[name], jax.random.key(seed), dtype)


def _assert_identical(want: dict, got: dict) -> None:
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        # Compared as raw bits, so -0.0 vs 0.0 or a NaN payload would also count as a difference.
        assert a.tobytes() == b.tobytes(), f"{name} differs"


def _jinfer_logits(params: dict, config: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    dtype = params["embed"].dtype
    cache = dense_kv_cache(config.num_layers, B, T, config.num_kv_heads, config.head_dim, dtype)
    h, _ = forward(params, jnp.asarray(tokens), positions, cache, None, config=config, attention=dense_cache_attention)
    return np.asarray(logits_from_hidden(params, h, config))


def _tokens(config: ModelConfig, batch: int = 2, length: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length), dtype=np.int32)


# ---- (a) safetensors round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_safetensors_round_trip_is_bit_identical(tmp_path, name, dtype):
    config, params = CONFIGS[name], _params(name, DTYPES[dtype])
    save_hf_dir(tmp_path, config, params)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    got_config, got = load_hf_dir(tmp_path)
    assert got_config == config
    _assert_identical(params, got)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_sharded_safetensors_round_trip(tmp_path, name):
    config, params = CONFIGS[name], _params(name, jnp.bfloat16)
    save_hf_dir(tmp_path, config, params, max_shard_bytes=16 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_identical(params, load_hf_dir(tmp_path)[1])

    # Saving again unsharded replaces the shards rather than leaving them beside the single file.
    save_hf_dir(tmp_path, config, params)
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    _assert_identical(params, load_hf_dir(tmp_path)[1])


def test_load_casts_to_requested_dtype(tmp_path):
    params = _params("llama_gqa", jnp.bfloat16)
    save_hf_dir(tmp_path, CONFIGS["llama_gqa"], params)
    _, got = load_hf_dir(tmp_path, dtype=np.float32)
    want = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    _assert_identical(want, got)


# ---- (b) parity with transformers on the directory we wrote --------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_loads_saved_dir_with_same_logits(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config, params = CONFIGS[name], _params(name, jnp.float32, seed=3)
    save_hf_dir(tmp_path, config, params, max_shard_bytes=64 * 1024)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model.eval()
    tokens = _tokens(config)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    got = _jinfer_logits(params, config, tokens)
    diff = float(np.abs(got - want).max())
    rel = diff / float(np.abs(want).max())
    print(f"{name}: max |jinfer - transformers| = {diff:.3e} (relative {rel:.2e})")
    assert rel < 1e-4, f"{name}: logits differ by {diff} (relative {rel})"
    if config.rope_scaling is not None:
        # Transformers must have read the scaling from config.json: without it the logits are far apart.
        unscaled = _jinfer_logits(params, dataclasses.replace(config, rope_scaling=None), tokens)
        assert np.abs(unscaled - want).max() > 1e3 * diff


# ---- (c) orbax round trips -----------------------------------------------------------------------------


class _FakeTokenizer:
    def __init__(self):
        self.saved_to = None

    def save(self, path):
        self.saved_to = path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_orbax_round_trip_is_bit_identical(tmp_path, name, dtype):
    config, params = CONFIGS[name], _params(name, DTYPES[dtype])
    tokenizer = _FakeTokenizer()
    save_orbax(tmp_path / "ckpt", config, params, tokenizer=tokenizer)
    assert tokenizer.saved_to is not None and str(tokenizer.saved_to).endswith("ckpt")
    got_config, got = restore_orbax(tmp_path / "ckpt")
    assert got_config == config
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(got))
    _assert_identical(params, got)
    tokens = _tokens(config, length=8)
    np.testing.assert_array_equal(_jinfer_logits(params, config, tokens), _jinfer_logits(got, config, tokens))


def test_orbax_atomic_save_replaces_whole_or_not_at_all(tmp_path):
    class FailingTokenizer:  # save_orbax writes the tokenizer last, so the params are already on disk
        def save(self, path):
            raise OSError("disk full")

    dst, config = tmp_path / "ckpt", CONFIGS["llama_gqa"]
    old, new = _params("llama_gqa", seed=0), _params("llama_gqa", seed=1)
    assert save_orbax_atomic(dst, config, old) == dst.absolute()
    with pytest.raises(OSError, match="disk full"):
        save_orbax_atomic(dst, config, new, FailingTokenizer())
    _assert_identical(old, restore_orbax(dst)[1])  # the failed write left the old checkpoint as it was
    save_orbax_atomic(dst, config, new)
    _assert_identical(new, restore_orbax(dst)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the failed write's temp dir is gone too


def test_orbax_restores_onto_given_shardings_and_dtype(tmp_path):
    config, params = CONFIGS["llama_gqa"], _params("llama_gqa", jnp.bfloat16)
    # numpy leaves, as the importers produce them, save the same as jax arrays.
    save_orbax(tmp_path, config, jax.tree.map(np.asarray, params))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    shardings = jax.tree.map(lambda _: sharding, params)
    _, got = restore_orbax(tmp_path, shardings=shardings)
    assert all(x.sharding == sharding for x in jax.tree.leaves(got))
    _assert_identical(params, got)
    _, got32 = restore_orbax(tmp_path, dtype=jnp.float32)
    _assert_identical(jax.tree.map(lambda x: x.astype(jnp.float32), params), got32)


# ---- (d) errors name the file and the problem -----------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    save_hf_dir(tmp_path, CONFIGS["llama_gqa"], _params("llama_gqa"))
    return tmp_path


def test_missing_config_json(hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*does not exist"):
        load_hf_dir(hf_dir)
    with pytest.raises(CheckpointError, match="config.json"):
        restore_orbax(hf_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_dir(tmp_path / "nowhere")


def test_malformed_config_json(hf_dir):
    (hf_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(CheckpointError, match="config.json.*num_attention_heads"):
        load_hf_dir(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*JSON"):
        load_hf_dir(hf_dir)


def test_missing_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_dir(hf_dir)


def test_missing_shard(tmp_path):
    save_hf_dir(tmp_path, CONFIGS["llama_gqa"], _params("llama_gqa"), max_shard_bytes=16 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard .*{shard}.* does not exist"):
        load_hf_dir(tmp_path)


def test_truncated_safetensors(hf_dir):
    file = hf_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(hf_dir)
    file.write_bytes(data[:6])  # not even a whole header length
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(hf_dir)


def _rewrite(file, edit) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(file), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_tensor_of_wrong_shape(hf_dir):
    name = "model.layers.1.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:-1]

    _rewrite(hf_dir / "model.safetensors", shrink)
    with pytest.raises(CheckpointError, match=rf"{name}.*model\.safetensors.*shape \[31, 64\].*\[32, 64\]"):
        load_hf_dir(hf_dir)


def test_missing_tensor(hf_dir):
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(hf_dir / "model.safetensors", lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=rf"{name}.*missing from .*model\.safetensors"):
        load_hf_dir(hf_dir)


def test_orbax_missing_params_and_mismatched_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_orbax(tmp_path / "nowhere")
    config, params = CONFIGS["llama_gqa"], _params("llama_gqa")
    save_orbax(tmp_path, config, params)
    # A config.json that disagrees with the stored arrays is caught before any array is read.
    wider = json.loads((tmp_path / "config.json").read_text()) | {"intermediate_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(wider))
    with pytest.raises(CheckpointError, match=r"w_down.*shape \[2, 80, 64\].*\[2, 96, 64\]"):
        restore_orbax(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    import shutil

    shutil.rmtree(tmp_path / "params")
    with pytest.raises(CheckpointError, match=r"params.*does not exist"):
        restore_orbax(tmp_path)
