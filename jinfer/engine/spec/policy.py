"""The adaptive speculation policy: how many tokens each request drafts in a step (host side, no jax).

A request's acceptance rate a (the chance that a drafted token is accepted, as a running average over its
verify steps) predicts what k drafted tokens buy: 1 + a + ... + a^k tokens per verify step (the accepted run
plus the one token the target always gives), at a cost of 1 + c * k decode steps, where c is what one more
token costs a verify step relative to a one-token step (`VERIFY_TOKEN_COST`, measured per platform). The
policy picks the k in 0..num_speculative_tokens with the most tokens per cost; k = 0 (no speculation) wins when
a is below about c. A request at k = 0 tries k = 1 again after `REPROBE_AFTER` tokens, since what it writes may
turn copyable; one whose host proposer found nothing `MISS_LIMIT` times running waits as long before asking
again (a request that is not speculating lets the engine run ahead of the host by a step). A step speculates only while at most `disable_by_batch_size` requests run: beyond it a verify
step's extra tokens cost compute that a batch no longer hides.
"""

from __future__ import annotations

import dataclasses

# The cost of one more token in a verify step relative to a plain decode step, per platform; measured on the
# 2-core CPU with SmolLM2-135M at batch 1 (benchmarks/spec_speed.py; RESULTS.md). A decode step on a GPU
# reads the weights either way, so extra tokens cost little there.
VERIFY_TOKEN_COST = {"cpu": 0.12, "gpu": 0.02, "tpu": 0.02}
PRIOR_ACCEPTANCE = 0.7  # a new request's assumed rate: it speculates from its first decode step, at full k
SMOOTHING = 0.3  # weight of the latest verify step in the running rate
REPROBE_AFTER = 16  # tokens decoded without speculation before a request at k = 0 drafts one token again
MISS_LIMIT = 2  # empty proposals in a row after which a request waits REPROBE_AFTER tokens


@dataclasses.dataclass
class SpecState:
    """One request's speculation record (also its metrics: RequestOutput.metrics)."""

    rate: float = PRIOR_ACCEPTANCE
    drafted: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, accepted
    steps: int = 0  # verify steps that carried a proposal
    idle: int = 0  # tokens decoded without speculation since the last verify step or empty proposal
    misses: int = 0  # empty proposals in a row (a host proposer found nothing)


def best_k(rate: float, k_max: int, token_cost: float) -> int:
    """The k in 0..k_max with the most expected tokens per unit of step cost."""
    best, best_value, run, total = 0, 1.0, 1.0, 1.0
    for k in range(1, k_max + 1):
        run *= rate
        total += run
        value = total / (1 + token_cost * k)
        if value > best_value * 1.0001:
            best, best_value = k, value
    return best


class AdaptivePolicy:
    def __init__(self, k_max: int, token_cost: float, adaptive: bool = True):
        self.k_max, self.token_cost, self.adaptive = k_max, token_cost, adaptive

    def k(self, state: SpecState) -> int:
        if not self.adaptive:
            return self.k_max
        if state.misses >= MISS_LIMIT and state.idle < REPROBE_AFTER:
            return 0
        k = best_k(state.rate, self.k_max, self.token_cost)
        if k == 0 and state.idle >= REPROBE_AFTER:
            return 1
        return k

    def record_miss(self, state: SpecState) -> None:
        """A host proposer had nothing to propose."""
        state.misses += 1
        state.idle = 0

    def record(self, state: SpecState, drafted: int, accepted: int) -> None:
        """After a verify step of `drafted` proposed tokens (0: the request decoded one token plainly)."""
        if not drafted:
            state.idle += 1
            return
        state.drafted += drafted
        state.accepted += accepted
        state.steps += 1
        state.idle = state.misses = 0
        state.rate = (1 - SMOOTHING) * state.rate + SMOOTHING * accepted / drafted
