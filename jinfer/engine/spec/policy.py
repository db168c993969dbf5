"""The adaptive speculation policy: how many tokens each request drafts in a step (host side, no jax).

A request's acceptance rate a (the chance that a drafted token is accepted, as a running average over its
verify steps) predicts what k drafted tokens buy: 1 + a + ... + a^k tokens per verify step (the accepted run
plus the one token the target always gives), at a cost of 1 + s + c * k decode steps: s is what a verify step
costs beyond a decode step whatever a row drafts (`SpeculativeConfig.step_cost`: a fixed part, since on the CPU
a matmul of 2 to 16 rows costs 1.5x one of 1 and the host cannot run ahead of a verify step, and each of the
k_max + 1 token slots the step's shape computes), c what drafting one more token costs (nothing for prompt
lookup; for a draft model or an early exit, its weights' share of the target's: `SpeculativeConfig.draft_cost`).
Both measured per platform. The policy picks the k in 0..num_speculative_tokens with the most tokens per cost;
k = 0 (no speculation) wins unless the rate is high enough to pay for the step.

A request at k = 0 drafts one token again after `backoff` tokens (16 at first), since what it writes may turn
copyable; each probe that gets nothing accepted doubles the wait (up to 256), an accepted token resets it. One
whose host proposer found nothing `MISS_LIMIT` times running waits likewise before asking again (a request that
is not speculating lets the engine run ahead of the host by a step). A step speculates only while at most
`disable_by_batch_size` requests run: beyond it a verify step's extra tokens cost compute a batch no longer hides.

A draft model keeps a cache of its own that every step must feed, at its weights' share of a step's cost,
also while its request is not speculating. So with `retire` (the draft-model method) a request whose speculation
stops paying (best k = 0, or a step with too many requests running) is retired instead of waiting to probe
again: its draft stops advancing (`RowInputs.draft_live`) and it never speculates again; a probe would need
the draft to catch up on every token it missed first.
"""

from __future__ import annotations

import dataclasses

# A verify step's cost beyond a decode step of the same rows: a fixed part and a part per token slot (k_max + 1
# per row), per platform. Measured on the 2-core CPU with SmolLM2-135M at batch 1, a context of 800 (RESULTS.md,
# issue 14), from one dispatch to the next: a decode step in a block 27.5 ms, a verify step of 5 slots 2.2
# decode steps, of 9 slots 2.6. On a GPU a decode step reads the weights either way and extra rows cost little
# (the GPU issue measures them).
VERIFY_STEP_COST = {"cpu": 0.8, "gpu": 0.05, "tpu": 0.05}
VERIFY_TOKEN_COST = {"cpu": 0.1, "gpu": 0.02, "tpu": 0.02}
PRIOR_ACCEPTANCE = 0.8  # a new request's assumed rate: prompt lookup speculates from its first decode step
SMOOTHING = 0.2  # weight of the latest verify step in the running rate (one failure at the prior keeps k_max)
REPROBE_AFTER = 16  # tokens decoded without speculation before a request at k = 0 drafts one token again
MAX_BACKOFF = 256
MISS_LIMIT = 2  # empty proposals in a row after which a request waits `backoff` tokens


@dataclasses.dataclass
class SpecState:
    """One request's speculation record (also its metrics: RequestOutput.metrics)."""

    rate: float = PRIOR_ACCEPTANCE
    drafted: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, accepted
    steps: int = 0  # verify steps that carried a proposal
    idle: int = 0  # tokens decoded without speculation since the last verify step or empty proposal
    misses: int = 0  # empty proposals in a row (a host proposer found nothing)
    backoff: int = REPROBE_AFTER  # tokens to wait before drafting again once speculation stopped paying
    retired: bool = False  # never speculates again; its draft model's cache no longer advances (AdaptivePolicy)


def best_k(rate: float, k_max: int, token_cost: float, step_cost: float = 0.0) -> int:
    """The k in 0..k_max with the most expected tokens per unit of step cost (`token_cost`: drafting a token)."""
    best, best_value, run, total = 0, 1.0, 1.0, 1.0
    for k in range(1, k_max + 1):
        run *= rate
        total += run
        value = total / (1 + step_cost + token_cost * k)
        if value > best_value * 1.0001:
            best, best_value = k, value
    return best


class AdaptivePolicy:
    """`retire`: a request whose speculation stops paying is retired rather than probed again (see above)."""

    def __init__(self, k_max: int, token_cost: float, adaptive: bool = True, step_cost: float = 0.0,
                 retire: bool = False):
        self.k_max, self.token_cost, self.adaptive, self.step_cost = k_max, token_cost, adaptive, step_cost
        self.retire = retire and adaptive

    def k(self, state: SpecState) -> int:
        if state.retired:
            return 0
        if not self.adaptive:
            return self.k_max
        if state.misses >= MISS_LIMIT and state.idle < state.backoff:
            return 0
        k = best_k(state.rate, self.k_max, self.token_cost, self.step_cost)
        if k == 0 and self.retire:
            state.retired = True
            return 0
        if k == 0 and state.idle >= state.backoff:
            return 1 if self.token_cost else self.k_max  # a probe; free proposals fill the step's slots
        return k

    def sit_out(self, state: SpecState) -> None:
        """The request runs in a step too large to speculate in."""
        if self.retire:
            state.retired = True

    def record_miss(self, state: SpecState) -> None:
        """A host proposer had nothing to propose."""
        state.misses += 1
        state.idle = 0
        if state.misses > MISS_LIMIT:  # a probe after the wait found nothing either
            state.backoff = min(2 * state.backoff, MAX_BACKOFF)

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
        state.backoff = REPROBE_AFTER if accepted else min(2 * state.backoff, MAX_BACKOFF)
