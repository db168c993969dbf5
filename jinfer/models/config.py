"""ModelConfig: the architecture of a Llama-family model, read from a checkpoint's own metadata.

Built by `ModelConfig.from_hf_config` (a Hugging Face `config.json` dict) or by the GGUF importer
(`checkpoints.gguf_import`), never by matching a model name. `to_hf_config` writes the same dict back,
so an orbax or safetensors directory carries a `config.json` that both jinfer and transformers read.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

RopeKind = Literal["linear", "llama3"]


class ConfigError(ValueError):
    """A model configuration field is missing, of the wrong type, or inconsistent with another."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Context-extension scaling of the RoPE frequencies (HF `rope_scaling`)."""

    kind: RopeKind
    factor: float
    # llama3 only: the band of wavelengths that is interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling.kind={self.kind!r} is not one of 'linear', 'llama3'")
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor={self.factor} must be > 0")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be > 0")
        for name, ids in (("bos_token_id", (self.bos_token_id,) if self.bos_token_id is not None else ()),
                          ("eos_token_ids", self.eos_token_ids)):
            for i in ids:
                if not 0 <= i < self.vocab_size:
                    raise ConfigError(f"{name} contains {i}, outside the vocabulary [0, {self.vocab_size})")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ConfigError(
                f"model_type={model_type!r} is not supported; expected one of {sorted(SUPPORTED_HF_MODEL_TYPES)}"
            )

        def need(key):
            if key not in cfg:
                raise ConfigError(f"config.json lacks the field {key!r}")
            return cfg[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        if not isinstance(heads, int) or heads <= 0:
            raise ConfigError(f"num_attention_heads={heads!r} must be a positive integer")
        head_dim = cfg.get("head_dim") or hidden // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_from_hf(cfg.get("rope_scaling") or cfg.get("rope_parameters")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has biases on Q/K/V but says so only through its model type.
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=model_type,
        )

    def to_hf_config(self) -> dict:
        rope_scaling = None
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            rope_scaling = {"rope_type": rs.kind, "factor": rs.factor}
            if rs.kind == "llama3":
                rope_scaling.update(
                    low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                )
        arch_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM"}[self.architecture]
        eos = list(self.eos_token_ids)
        return {
            "architectures": [arch_class],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "hidden_act": "silu",
        }


SUPPORTED_HF_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def _rope_scaling_from_hf(rs: dict | None) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"rope_scaling.rope_type={kind!r} is not supported (only 'linear', 'llama3')")
    if "factor" not in rs:
        raise ConfigError("rope_scaling lacks the field 'factor'")
    if kind == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    return RopeScaling(
        "llama3",
        float(rs["factor"]),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )
