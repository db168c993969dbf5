"""EngineConfig: the shapes and limits of the serving engine (slots, pages, buckets, dtype).

Two kinds of compiled step, each keyed by a bucket (`jinfer.runtime.runner` names them):
- a *decode block*: one token per running request (rows padded up to one of `decode_buckets`), run for up to
  `decode_steps` tokens in one dispatch (a device-side loop that stops rows on their stop tokens);
- a *prefill step*: the chunks of prompts being prefilled beside the other requests' decode tokens (tokens
  padded up to one of `token_buckets`, `max_slots` rows, at most `max_prefill_chunk` tokens of one request).
So warm-up compiles len(decode_buckets) + len(token_buckets) functions, and serving compiles nothing else.
With `speculative` set, a third kind: a *verify step* per decode bucket (rows of 1 + k tokens, k =
num_speculative_tokens), so len(decode_buckets) more.

Fields left None take the platform's default (`resolve(platform)`, which the runtime calls with the platform
it runs on; `PLATFORM_DEFAULTS` says why each value is what it is).
"""

from __future__ import annotations

import dataclasses

from jinfer.engine.spec.config import SpeculativeConfig
from jinfer.quant.formats import check_quantization, resolve_kv_cache_dtype

# Measured on the 2-core development CPU with SmolLM2-135M (benchmarks/engine_vs_peers.py, RESULTS.md):
# - a matmul at M = 1 row costs a third of one at M = 16 (the weights stream from memory either way, but 16
#   rows add the compute), so batch-1 decode needs a bucket of 1; the MLP at M = 16 costs ~1.3x M = 8 and the
#   paged attention's gathers grow with the rows, so 8 running requests get a bucket of their own;
# - prefill runs at the model's rate only in wide chunks (a 512-token prompt in one step of 512, not four of
#   128 padded to 256), and 16 slots let the 16-request workload decode at once;
# - 8 decode steps per dispatch pay the host's work and the launch once per 8 tokens;
# - each layer's weights kept as their own arrays (`per_layer_weights`): XLA CPU copies a weight's slice out
#   of the stacked [L, ...] array before every matmul of a scanned layer, which costs 4-7% of a step's time
#   at 1-512 rows and ~20% in the 16-request workload (`jinfer.models.llama.unstack_layers`).
# On accelerators the weights' read dominates up to far larger batches, so the buckets are coarser and the
# slots more; a decode block of 8 keeps the host off the critical path (the GPU issue measures them); GPU
# matmuls read a stacked weight's slice in place (`jinfer.runtime.xla_flags`), so the stacked form stays.
PLATFORM_DEFAULTS: dict[str, dict] = {
    "cpu": dict(max_slots=16, decode_buckets=(1, 4, 8, 16), token_buckets=(16, 64, 256, 512), max_prefill_chunk=512,
                decode_steps=8, per_layer_weights=True),
    "gpu": dict(max_slots=64, decode_buckets=(1, 8, 64), token_buckets=(64, 256, 1024), max_prefill_chunk=512,
                decode_steps=8, per_layer_weights=False),
    "tpu": dict(max_slots=64, decode_buckets=(8, 64), token_buckets=(128, 512, 1024), max_prefill_chunk=512,
                decode_steps=8, per_layer_weights=False),
}
PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_slots: int | None = None  # requests running at once (decode slots)
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pages in the pool; None: memory_fraction of free device memory
    memory_fraction: float = 0.5  # of the device memory left after the weights, when num_pages is None
    cpu_default_pages: int = 512  # the pool on a device that reports no memory statistics (the CPU)
    max_model_len: int | None = None  # None: the model's context
    token_buckets: tuple[int, ...] | None = None  # tokens per prefill step, padded up to one of these
    decode_buckets: tuple[int, ...] | None = None  # running requests per decode block, padded up to one of these
    decode_steps: int | None = None  # most tokens a decode block computes per request in one dispatch
    max_prefill_chunk: int | None = None  # prompt tokens one request may prefill in one step
    per_layer_weights: bool | None = None  # each layer's weights as their own arrays, not stacked [L, ...]
    enable_prefix_caching: bool = True
    max_waiting: int = 4096  # requests queued before new ones are refused
    dtype: str = "float32"
    quantization: str | None = None  # layer matmul weights quantized at load: "int8" | "int4" | "fp8" (jinfer.quant)
    quantization_group_size: int | None = None  # inputs per scale; None: the format's default (int4: 128)
    # KV pages stored in 8 bits with a scale per token and KV head (jinfer.quant.kv): "int8" | "fp8" (alias
    # "fp8_e4m3": float8_e4m3fn); None or "auto": the model's dtype. Set to its canonical name (None, "int8", "fp8").
    kv_cache_dtype: str | None = None
    max_logprobs: int = 5  # top-n logprobs a request may ask for (a static width of the sampler)
    tensor_parallel: int = 1  # devices of the mesh's `model` axis (jinfer.runtime.sharding); 1: one device
    data_parallel: int = 1  # engine replicas, each on its own tensor_parallel devices (jinfer.runtime.data_parallel)
    # Speculative decoding (jinfer.engine.spec.config): a SpeculativeConfig, or vLLM's dict form; None: off.
    speculative: SpeculativeConfig | None = None

    def __post_init__(self):
        for name in ("page_size", "max_waiting", "cpu_default_pages", "tensor_parallel", "data_parallel"):
            _positive(self, name)
        for name in ("max_slots", "max_prefill_chunk", "decode_steps"):
            if getattr(self, name) is not None:
                _positive(self, name)
        for name in ("token_buckets", "decode_buckets"):
            b = getattr(self, name)
            if b is None:
                continue
            if not isinstance(b, tuple) or not b or list(b) != sorted(set(b)) or not all(
                    isinstance(x, int) and x > 0 for x in b):
                raise ValueError(f"EngineConfig.{name}={b!r} must be a tuple of positive, strictly increasing integers")
        if self.max_slots is not None:
            if self.token_buckets is not None and self.token_buckets[-1] < self.max_slots:
                raise ValueError(f"the largest token bucket {self.token_buckets[-1]} must hold one token per slot "
                                 f"(max_slots={self.max_slots})")
            if self.decode_buckets is not None and self.decode_buckets[-1] < self.max_slots:
                raise ValueError(f"the largest decode bucket {self.decode_buckets[-1]} must hold every slot "
                                 f"(max_slots={self.max_slots})")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"EngineConfig.num_pages={self.num_pages} must be at least 2")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"EngineConfig.memory_fraction={self.memory_fraction} must be in (0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"EngineConfig.dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        check_quantization(self.quantization, self.quantization_group_size, "EngineConfig.quantization")
        object.__setattr__(self, "kv_cache_dtype",  # frozen: the one canonical spelling, set once here
                           resolve_kv_cache_dtype(self.kv_cache_dtype, "EngineConfig.kv_cache_dtype"))
        if self.per_layer_weights not in (None, True, False):
            raise ValueError(f"EngineConfig.per_layer_weights={self.per_layer_weights!r} must be True, False or None")
        object.__setattr__(self, "speculative", SpeculativeConfig.from_dict(self.speculative))
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs={self.max_logprobs!r} must be an integer >= 0")

    def resolve(self, platform: str) -> EngineConfig:
        """This config with every field left None set to the platform's default ('cpu', 'gpu' or 'cuda',
        'tpu'). Decode buckets the user did not give stop at max_slots; one the user did give is kept."""
        key = PLATFORM_ALIASES.get(platform, platform)
        if key not in PLATFORM_DEFAULTS:
            raise ValueError(f"platform={platform!r} is not one of {sorted(PLATFORM_DEFAULTS)}")
        d = PLATFORM_DEFAULTS[key]
        slots = self.max_slots if self.max_slots is not None else d["max_slots"]
        decode = self.decode_buckets
        if decode is None:
            decode = tuple(b for b in d["decode_buckets"] if b < slots) + (slots,)
        tokens = self.token_buckets
        if tokens is None:
            tokens = d["token_buckets"] if d["token_buckets"][-1] >= slots else d["token_buckets"] + (slots,)
        return dataclasses.replace(
            self, max_slots=slots, decode_buckets=decode, token_buckets=tokens,
            max_prefill_chunk=self.max_prefill_chunk if self.max_prefill_chunk is not None else d["max_prefill_chunk"],
            decode_steps=self.decode_steps if self.decode_steps is not None else d["decode_steps"],
            per_layer_weights=(self.per_layer_weights if self.per_layer_weights is not None
                               else d["per_layer_weights"]),
            speculative=None if self.speculative is None else self.speculative.resolve(key))

    @property
    def resolved(self) -> bool:
        return None not in (self.max_slots, self.token_buckets, self.decode_buckets, self.decode_steps,
                            self.max_prefill_chunk, self.per_layer_weights)

    def context_len(self, model_max: int) -> int:
        """Tokens one request may hold: max_model_len, capped at the model's own context."""
        return min(self.max_model_len or model_max, model_max)

    @property
    def max_step_tokens(self) -> int:
        return self.token_buckets[-1]


def _positive(config: EngineConfig, name: str) -> None:
    v = getattr(config, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"EngineConfig.{name}={v!r} must be a positive integer")
