"""RequestOutput: what a finished (or streaming) request hands back to the caller."""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, including the stop token when one ended the request
    text: str  # generated text, a matched stop string excluded
    finish_reason: FinishReason | None  # None while the request is still running
