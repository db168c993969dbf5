"""What a verify step costs beyond a decode step, measured on the machine the engine runs on (host side, no jax).

The adaptive policy verifies prompt lookup's proposals only while they pay for the verify step's extra cost, so
that cost must be right: on the 2-core CPU with SmolLM2-135M a 9-slot verify step measured 1.74 decode tokens
in one session and 3.06 in another (RESULTS.md, session 33), and no platform constant fits both. The engine
times every step it collects (`observe`: from when the device could start it, its dispatch or the previous
step's result, whichever is later, until its tokens are on the host) and the scheduler asks here for the
extra cost at its batch size: a verify step's seconds over a decode token's, minus one. A decode block's
seconds count per step it ran, so a token decoded in a long block and one decoded alone (a lookup after each
token) each count at what they cost. Medians over the latest `WINDOW` steps of each kind, so that a few steps
stretched by a pause of the caller (a notebook, a slow stream reader) do not move the cost.
"""

from __future__ import annotations

import collections
import statistics

WINDOW = 16  # steps of each kind and batch size kept
MIN_SAMPLES = 3  # of each kind before a measured cost replaces the platform's


class StepCosts:
    def __init__(self):
        self._decode: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=WINDOW))
        self._verify: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=WINDOW))

    def observe(self, rows: int, verify: bool, steps: int, seconds: float) -> None:
        """A step of `rows` rows took `seconds`: a verify step, or a decode block of `steps` steps."""
        if verify:
            self._verify[rows].append(seconds)
        elif steps > 0:
            self._decode[rows].append(seconds / steps)

    def verify_extra(self, rows: int) -> float | None:
        """A verify step's cost beyond one decode token's, in decode tokens, at `rows` rows; None until both
        kinds have been seen `MIN_SAMPLES` times at that size."""
        d, v = self._decode.get(rows), self._verify.get(rows)
        if not d or not v or len(d) < MIN_SAMPLES or len(v) < MIN_SAMPLES:
            return None
        return max(0.0, statistics.median(v) / statistics.median(d) - 1.0)
