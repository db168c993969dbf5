"""SpeculativeConfig: how the engine speculates (vLLM's `speculative_config` keys, plus early exit).

`LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4})`; every other key has a
default, so the method and k alone work. Methods (the proposers, `jinfer.engine.spec.proposers` on the host and
`jinfer.runtime.spec.drafters` on the device):
- "ngram": prompt lookup: the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) matched against
  the prompt and the output so far; what followed the latest match is proposed (host side, no model);
- "draft": a smaller model with the target's vocabulary (`model`: anything `checkpoints.load.load` takes), run
  by the engine beside the target with its own paged KV cache (same pages, its own pool);
- "early_exit": the target's first `early_exit_layers` layers with its final norm and LM head draft (self
  speculation: no second checkpoint, and the draft's K/V are the target's own for those layers).

The adaptive policy (`jinfer.engine.spec.policy`): prompt lookup verifies a request's first proposal, then its
proposals while its mean accepted run pays for a verify step (a cost the engine measures by timing its own steps:
`measure_costs`), and scores the others against what the request decodes; a drafter's k follows its running
acceptance; no request speculates in a step while more than `disable_by_batch_size` requests run (measured
crossover on the platform: benchmarks/spec_speed.py). Everything here is host-side and jax-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jinfer.engine.spec.policy import KEEP_LOOKING, VERIFY_STEP_COST, VERIFY_TOKEN_COST

METHODS = ("ngram", "draft", "early_exit")
# The most running requests a step speculates for, per platform. On the 2-core CPU with SmolLM2-135M
# (benchmarks/spec_speed.py, RESULTS.md): prompt lookup at 84% acceptance gained 1.5-1.6x at one request and
# nothing at eight (0.99x: 40 matmul rows against 8), so the CPU stops at two.
DISABLE_BY_BATCH_SIZE = {"cpu": 2, "gpu": 32, "tpu": 32}


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int = 4  # k: the most tokens proposed per request per step
    # ngram: the longest and shortest suffix matched. 3..6 rather than 2..4: on SmolLM2's grounded outputs a
    # two-token match guesses wrong more often than it pays (replayed, RESULTS.md session 32)
    prompt_lookup_max: int = 6
    prompt_lookup_min: int = 3
    model: object | None = None  # draft: the draft model (a path or name, or a LoadedModel)
    early_exit_layers: int | None = None  # early_exit: the layers that draft; None: a quarter of the target's
    disable_by_batch_size: int | None = None  # no speculation in a step with more running requests; None: platform
    adaptive: bool = True  # each request's k follows its acceptance (off: always num_speculative_tokens)
    verify_step_cost: float | None = None  # a verify step's cost beyond a decode step's; None: the platform's
    verify_token_cost: float | None = None  # a token slot's share of a verify step; None: the platform's
    draft_cost: float | None = None  # drafting one token, relative to a target decode step; None: the drafter's
    #   weights' share of the target's (0 for prompt lookup), set when the engine is built
    keep_looking: bool | None = None  # ngram: after lookups that gave no verify, look again at doubling gaps (1 token
    #   to a decode block) rather than wait 16+ tokens; None: the platform's (where short blocks cost little)
    measure_costs: bool | None = None  # ngram: the verify step's extra cost is measured by timing the engine's own
    #   steps (`jinfer.engine.spec.step_costs`), the costs above only its start; None: unless a cost is given

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method={self.method!r} must be one of {list(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            _positive_int(name, getattr(self, name))
        if self.num_speculative_tokens > 16:
            raise ValueError(f"speculative_config.num_speculative_tokens={self.num_speculative_tokens} must be at "
                             "most 16 (a verify step computes k + 1 tokens per request)")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min={self.prompt_lookup_min} must not exceed "
                             f"prompt_lookup_max={self.prompt_lookup_max}")
        for name in ("early_exit_layers", "disable_by_batch_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.method == "draft" and self.model is None:
            raise ValueError("speculative_config.model must name the draft model for method 'draft'")
        if self.method != "draft" and self.model is not None:
            raise ValueError(f"speculative_config.model is only for method 'draft' (method={self.method!r})")
        if self.method != "early_exit" and self.early_exit_layers is not None:
            raise ValueError(f"speculative_config.early_exit_layers is only for method 'early_exit' "
                             f"(method={self.method!r})")
        if self.verify_token_cost is not None and not (isinstance(self.verify_token_cost, (int, float))
                                                       and 0 <= self.verify_token_cost <= 10):
            raise ValueError(f"speculative_config.verify_token_cost={self.verify_token_cost!r} must be a number "
                             "in [0, 10]")
        if self.verify_step_cost is not None and not (isinstance(self.verify_step_cost, (int, float))
                                                      and 0 <= self.verify_step_cost <= 10):
            raise ValueError(f"speculative_config.verify_step_cost={self.verify_step_cost!r} must be a number "
                             "in [0, 10]")
        if self.draft_cost is not None and not (isinstance(self.draft_cost, (int, float)) and 0 <= self.draft_cost <= 10):
            raise ValueError(f"speculative_config.draft_cost={self.draft_cost!r} must be a number in [0, 10]")
        for name in ("adaptive", "keep_looking", "measure_costs"):
            v = getattr(self, name)
            if not isinstance(v, bool) and not (name != "adaptive" and v is None):
                raise ValueError(f"speculative_config.{name}={v!r} must be true or false")
        if self.measure_costs and self.method != "ngram":
            raise ValueError(f"speculative_config.measure_costs is only for method 'ngram' (method={self.method!r}): "
                             "a drafter's verify step also drafts, at a cost set by draft_cost")

    @classmethod
    def from_dict(cls, d: Mapping | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """vLLM's dict form (unknown keys are an error naming them); a SpeculativeConfig or None as it is."""
        if d is None or isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"speculative_config={d!r} must be a dict such as "
                             "{'method': 'ngram', 'num_speculative_tokens': 4}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in d:
            raise ValueError(f"speculative_config.method is required (one of {list(METHODS)})")
        return cls(**d)

    def resolve(self, platform: str) -> SpeculativeConfig:
        """This config with the fields left None set to the platform's defaults."""
        return dataclasses.replace(
            self, disable_by_batch_size=(self.disable_by_batch_size if self.disable_by_batch_size is not None
                                         else DISABLE_BY_BATCH_SIZE.get(platform, 32)),
            verify_token_cost=(self.verify_token_cost if self.verify_token_cost is not None
                               else VERIFY_TOKEN_COST.get(platform, 0.02)),
            verify_step_cost=(self.verify_step_cost if self.verify_step_cost is not None
                              else VERIFY_STEP_COST.get(platform, 0.05)),
            keep_looking=(self.keep_looking if self.keep_looking is not None
                              else KEEP_LOOKING.get(platform, False)),
            measure_costs=(self.measure_costs if self.measure_costs is not None
                           else self.method == "ngram" and self.verify_step_cost is None
                           and self.verify_token_cost is None))

    @property
    def step_cost(self) -> float:
        """A verify step's cost beyond a decode step's, in target decode steps (once resolved): its fixed part and
        its k + 1 tokens per row, whatever a row drafts (the step's shape has room for k)."""
        return (self.verify_step_cost or 0.0) + (self.verify_token_cost or 0.0) * self.num_speculative_tokens

    def draft_layers(self, num_layers: int) -> int:
        """early_exit: the target layers that draft (checked against the target's depth)."""
        m = self.early_exit_layers if self.early_exit_layers is not None else max(1, num_layers // 4)
        if m >= num_layers:
            raise ValueError(f"speculative_config.early_exit_layers={m} must be fewer than the model's {num_layers} "
                             "layers")
        return m


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"speculative_config.{name}={v!r} must be a positive integer")
