"""jinfer: a compiled LLM inference engine on JAX."""

from jinfer.config import ConfigError, ModelConfig, RopeScaling

__all__ = ["ConfigError", "ModelConfig", "RopeScaling"]
