"""The adaptive speculation policy: how many tokens each request drafts in a step (host side, no jax).

A device drafter's request (a draft model, early exit) has an acceptance rate a (the chance that a drafted
token is accepted, as a running average over its verify steps), which predicts what k drafted tokens buy:
1 + a + ... + a^k tokens per verify step (the accepted run plus the one token the target always gives), at a
cost of 1 + s + c * k decode steps: s is what a verify step costs beyond a decode step whatever a row drafts
(`SpeculativeConfig.step_cost`: a fixed part, since on the CPU a matmul of 2 to 16 rows costs 1.5x one of 1 and
the host cannot run ahead of a verify step, and each of the k_max + 1 token slots the step's shape computes), c
what drafting one more token costs (its weights' share of the target's: `SpeculativeConfig.draft_cost`). Both
measured per platform. The policy picks the k in 0..num_speculative_tokens with the most tokens per cost;
k = 0 (no speculation) wins unless the rate is high enough to pay for the step.

A host proposer's guesses (prompt lookup) cost nothing to make, so for them the policy scores instead of
probing: it keeps `gain`, the running mean of the tokens a verify step of its k_max proposals accepted, and
verifies a proposal only while that beats the step's extra cost (`step_cost`, in decode steps: measured by the
engine on its machine, `jinfer.engine.spec.step_costs`, unless the config fixes it): acceptance is bimodal on
copied text (a copied run accepts everything, the rest nothing), so the mean accepted run, not a per-token rate,
predicts what the next verify step buys. A new request verifies its first proposal (its gain is unknown:
`None`), since text that copies from its prompt usually starts copying at once and a wrong guess costs one
step's extra cost; that step's outcome is its gain. A proposal it does not verify is kept as a shadow and
scored against the tokens the request then decodes (the same count a verify step would have accepted: exact for
greedy rows; for sampled ones a deterministic guess is accepted with the probability that the target samples it,
which is the chance it matches), so the gain follows the text at no device cost, and chat (which rarely
copies) pays no further failed verify step. Where a short decode block costs about what as many tokens of a
full one do (the CPU: `keep_looking`), a request whose lookups give no verify keeps looking, at gaps that
double from one token to a whole decode block (`lookup_gap`; while its gain pays, only after `COPY_GRACE`
lookups after every token: a copy that broke off usually resumes within a token or two), so chat, which finds
little, is synced once a block (looking up after every token cost chat 6% on the CPU: the host's sync each
token). Elsewhere one whose lookups yielded no verify `MISS_LIMIT` times running waits `backoff` tokens (16 at
first, doubling while lookups keep finding nothing, up to 256) before looking again: a request that is not
speculating lets the engine run ahead of the host by a step.

A device drafter's request at k = 0 drafts one token again after `backoff` tokens, since what it writes may turn
copyable; each probe that gets nothing accepted doubles the wait (up to 256), an accepted token resets it. The
first wait is at least what keeps probes within `EXPLORE_BUDGET` of the decode time (a probe's cost over the
budget: on the CPU early exit's probe costs about two decode steps, so it waits ~100 tokens, not 16). A step
speculates only while at most `disable_by_batch_size` requests run: beyond it a verify step's extra tokens cost
compute a batch no longer hides.

A draft model keeps a cache of its own that every step must feed, at its weights' share of a step's cost,
also while its request is not speculating. So with `retire` (the draft-model method) a request whose speculation
stops paying (best k = 0, or a step with too many requests running) is retired instead of waiting to probe
again: its draft stops advancing (`RowInputs.draft_live`) and it never speculates again; a probe would need
the draft to catch up on every token it missed first.
"""

from __future__ import annotations

import dataclasses
import math

# A verify step's cost beyond a decode step of the same rows: a fixed part and a part per token slot (k_max + 1
# per row), per platform. Measured on the 2-core CPU with SmolLM2-135M at batch 1, a context of 800 (RESULTS.md,
# issue 14), from one dispatch to the next: a decode step in a block 27.5 ms, a verify step of 5 slots 2.2
# decode steps, of 9 slots 2.6 (and 1.74 to 3.06 in later sessions: the machine under this CPU changes). On a GPU a
# decode step reads the weights either way and extra rows cost little (the GPU issue measures them). For prompt
# lookup these are only where a new engine starts: it measures its own (`jinfer.engine.spec.step_costs`).
VERIFY_STEP_COST = {"cpu": 0.8, "gpu": 0.05, "tpu": 0.05}
VERIFY_TOKEN_COST = {"cpu": 0.1, "gpu": 0.02, "tpu": 0.02}
PRIOR_ACCEPTANCE = 0.8  # a device drafter's assumed rate: it speculates from the start where its costs allow
SMOOTHING = 0.2  # weight of the latest verify step in the running rate (one failure at the prior keeps k_max)
REPROBE_AFTER = 16  # tokens decoded without speculation before a request at k = 0 drafts one token again
MAX_BACKOFF = 256
MISS_LIMIT = 2  # lookups without a verify in a row after which a request waits `backoff` tokens (unless it keeps
#   looking)
GAIN_SMOOTHING = 0.5  # weight of the latest verify step (or scored shadow) in the running gain
EXPLORE_BUDGET = 0.02  # the share of decode time a device drafter's probes may cost
# Whether a host proposer keeps looking up after misses (at doubling gaps, `lookup_gap`) rather than wait: on the
# 2-core CPU a one-token step cost 41 ms against a block's 42 a token at a context of 750 (SmolLM2-135M, batch 1,
# RESULTS.md session 32); on the GPU a block's host work and launch are paid once for its steps.
KEEP_LOOKING = {"cpu": True, "gpu": False, "tpu": False}
# Lookups after every token that a request whose gain pays makes before its gaps start doubling: replayed on
# SmolLM2's outputs (RESULTS.md session 33), 8 kept 5% more of the grounded gain than none and cost chat 0.1%;
# with no limit, a chat request after one lucky verify synced every token (chat 0.94x in the engine).
COPY_GRACE = 8


@dataclasses.dataclass
class SpecState:
    """One request's speculation record (also its metrics: RequestOutput.metrics)."""

    rate: float = PRIOR_ACCEPTANCE  # device drafters: running acceptance per drafted token
    drafted: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, accepted
    steps: int = 0  # verify steps that carried a proposal
    idle: int = 0  # tokens decoded without speculation since the last verify step or empty proposal
    misses: int = 0  # host proposer's lookups in a row that gave no verify (found nothing, or only scored)
    backoff: int = REPROBE_AFTER  # tokens to wait before drafting again once speculation stopped paying
    retired: bool = False  # never speculates again; its draft model's cache no longer advances (AdaptivePolicy)
    gain: float | None = None  # host proposers: running mean of the tokens a verify step accepted (None: untried)
    shadow: tuple[int, list[int]] | None = None  # (output index it guesses from, proposal): scored, not verified


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
    """`host`: the proposer is the host's (free guesses: scored by `gain`, see above), else a device drafter's
    (`rate`, probes); `keep_looking`: a host proposer keeps looking up after misses, at doubling gaps
    (`KEEP_LOOKING`); `retire`: a request whose speculation stops paying is retired rather than probed again (see
    above)."""

    def __init__(self, k_max: int, token_cost: float, adaptive: bool = True, step_cost: float = 0.0,
                 retire: bool = False, host: bool = False, keep_looking: bool = False):
        self.k_max, self.token_cost, self.adaptive, self.step_cost = k_max, token_cost, adaptive, step_cost
        self.retire = retire and adaptive
        self.host, self.keep_looking = host, keep_looking
        # A probe drafts one token: a verify step's extra cost and one drafted token's.
        self.first_wait = (REPROBE_AFTER if host
                           else max(REPROBE_AFTER, math.ceil((step_cost + token_cost) / EXPLORE_BUDGET)))

    def new_state(self) -> SpecState:
        return SpecState(backoff=self.first_wait)

    def k(self, state: SpecState) -> int:
        """How many tokens the request drafts (a device drafter) or looks up (a host proposer) this step."""
        if state.retired:
            return 0
        if not self.adaptive:
            return self.k_max
        if not (self.host and self.keep_looking) and state.misses >= MISS_LIMIT and state.idle < state.backoff:
            return 0
        if self.host:
            return self.k_max  # the step's shape has room for k_max whatever a row fills: guesses are free
        k = best_k(state.rate, self.k_max, self.token_cost, self.step_cost)
        if k == 0 and self.retire:
            state.retired = True
            return 0
        if k == 0 and state.idle >= state.backoff:
            return 1  # a probe
        return k

    def lookup_gap(self, state: SpecState, block: int) -> int:
        """Tokens a host proposer's request decodes before its next lookup, after `misses` lookups without a
        verify: one where it does not keep looking; else 1, 2, 4, ... up to a decode block of `block`, the
        doubling put off by `COPY_GRACE` lookups while its gain pays (it has been copying, and a copy that broke
        off at a changed word usually resumes a token or two later)."""
        if not self.keep_looking:
            return 1
        grace = COPY_GRACE if state.gain is not None and state.gain > self.step_cost else 0
        return min(2 ** max(state.misses - 1 - grace, 0), block)

    def verifies(self, state: SpecState) -> bool:
        """Whether a host proposer's proposal is verified (else it is only scored, `shadow`)."""
        return not self.adaptive or state.gain is None or state.gain > self.step_cost

    def take(self, state: SpecState, at: int, proposal: list[int]) -> list[int]:
        """A host proposer's lookup after the request's first `at` output tokens: the proposal to verify, or []
        (it found nothing, or its proposal is only scored: a shadow). Each counts as a miss."""
        if proposal and self.verifies(state):
            return proposal
        if proposal:
            self.shadow(state, at, proposal)
        else:
            self.record_miss(state)
        return []

    def sit_out(self, state: SpecState) -> None:
        """The request runs in a step too large to speculate in."""
        if self.retire:
            state.retired = True

    def record_miss(self, state: SpecState) -> None:
        """A host proposer's lookup gave no verify: it found nothing, or its proposal is only scored."""
        state.misses += 1
        state.idle = 0
        if state.misses > MISS_LIMIT:  # a lookup after the wait gave nothing either
            state.backoff = min(2 * state.backoff, MAX_BACKOFF)

    def shadow(self, state: SpecState, at: int, proposal: list[int]) -> None:
        """A host proposer's proposal, made after the request's first `at` output tokens, to be scored against
        the tokens it decodes next (one at a time: a later lookup waits for this score)."""
        state.shadow = (at, list(proposal))
        self.record_miss(state)

    def score_shadow(self, state: SpecState, output_ids: list[int]) -> None:
        """Scores the pending shadow once the output shows how many of its tokens a verify step would have kept:
        the first mismatch, all of them, or already enough to make verifying pay (the copy is under way: the
        request verifies from its next lookup rather than decode the rest of it a token at a time)."""
        if state.shadow is None:
            return
        at, proposal = state.shadow
        seen = output_ids[at:at + len(proposal)]
        kept = 0
        while kept < len(seen) and seen[kept] == proposal[kept]:
            kept += 1
        gain = self._gain_after(state, kept * self.k_max / len(proposal))
        if kept == len(seen) < len(proposal) and gain <= self.step_cost:
            return  # every token so far matched, too few yet to pay for a verify step: wait for more
        state.shadow = None
        state.gain = gain

    @staticmethod
    def _gain_after(state: SpecState, accepted: float) -> float:
        if state.gain is None:
            return accepted
        return (1 - GAIN_SMOOTHING) * state.gain + GAIN_SMOOTHING * accepted

    def record(self, state: SpecState, drafted: int, accepted: int) -> None:
        """After a verify step of `drafted` proposed tokens (0: the request decoded one token plainly)."""
        if not drafted:
            state.idle += 1
            return
        state.drafted += drafted
        state.accepted += accepted
        state.steps += 1
        state.idle = state.misses = 0
        if self.host:
            state.gain = self._gain_after(state, accepted * self.k_max / drafted)
        else:
            state.rate = (1 - SMOOTHING) * state.rate + SMOOTHING * accepted / drafted
        state.backoff = self.first_wait if accepted else min(2 * state.backoff, max(MAX_BACKOFF, self.first_wait))
