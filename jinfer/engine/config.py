"""EngineConfig: the shapes and limits of the serving engine (slots, pages, buckets, dtype).

Every compiled step function is keyed by one token bucket (how many tokens a step carries, padded up)
and one query-per-slot width (1 for decode-only steps, `max_prefill_chunk` capped at the bucket for steps
with a prefill chunk), so the engine compiles 2 x len(token_buckets) functions at warm-up and no others.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # requests running at once (decode slots)
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pages in the pool; None: memory_fraction of free device memory
    memory_fraction: float = 0.5  # of the device memory left after the weights, when num_pages is None
    cpu_default_pages: int = 512  # the pool on a device that reports no memory statistics (the CPU)
    max_model_len: int | None = None  # None: the model's context
    token_buckets: tuple[int, ...] = (16, 64, 256)  # tokens per step, padded up to one of these
    max_prefill_chunk: int = 128  # prompt tokens one request may prefill in one step
    enable_prefix_caching: bool = True
    max_waiting: int = 4096  # requests queued before new ones are refused
    dtype: str = "float32"
    max_logprobs: int = 5  # top-n logprobs a request may ask for (a static width of the sampler)
    tensor_parallel: int = 1  # devices of the mesh's `model` axis (jinfer.runtime.sharding); 1: one device
    data_parallel: int = 1  # engine replicas, each on its own tensor_parallel devices (jinfer.runtime.data_parallel)

    def __post_init__(self):
        for name in ("max_slots", "page_size", "max_prefill_chunk", "max_waiting", "cpu_default_pages",
                     "tensor_parallel", "data_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"EngineConfig.{name}={v!r} must be a positive integer")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"EngineConfig.num_pages={self.num_pages} must be at least 2")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"EngineConfig.memory_fraction={self.memory_fraction} must be in (0, 1]")
        b = self.token_buckets
        if not b or list(b) != sorted(set(b)) or b[0] <= 0:
            raise ValueError(f"EngineConfig.token_buckets={b} must be positive and strictly increasing")
        if b[-1] < self.max_slots:
            raise ValueError(f"the largest token bucket {b[-1]} must hold one token per slot "
                             f"(max_slots={self.max_slots})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"EngineConfig.dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs={self.max_logprobs!r} must be an integer >= 0")

    def context_len(self, model_max: int) -> int:
        """Tokens one request may hold: max_model_len, capped at the model's own context."""
        return min(self.max_model_len or model_max, model_max)

    @property
    def max_step_tokens(self) -> int:
        return self.token_buckets[-1]
