"""Stop strings on a stream of text deltas: the matched string is never emitted, and text that could
still become the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """`include`: the matched stop string is emitted too (vLLM's include_stop_str_in_output)."""

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = tuple(stops)
        self.include = include
        # A stop string not yet complete can only begin in the last (longest - 1) characters.
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that matched

    def feed(self, delta: str, armed: bool = True) -> str:
        """Adds new text; returns the part safe to emit. Sets `stopped` once a stop string has matched, only
        while `armed` (a request's min_tokens disarms it: text before then is emitted as it is)."""
        if self.stopped:
            return ""
        if not armed:
            out, self.pending = self.pending + delta, ""
            return out
        self.pending += delta
        hits = [(i, len(s)) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            at, length = min(hits)
            self.matched = self.pending[at:at + length]
            out, self.pending = self.pending[: at + length * self.include], ""
            return out
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return ""
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
