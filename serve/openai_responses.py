"""Engine chunks -> OpenAI response objects: whole completions and the chunks of a server-sent-event stream,
for `/v1/completions` (object "text_completion") and `/v1/chat/completions` ("chat.completion" and
"chat.completion.chunk"), with logprobs in each endpoint's own layout and usage counts."""

from __future__ import annotations

import dataclasses
import json

from jinfer.engine.outputs import TokenLogprobs
from jinfer.serve.engine_thread import Chunk


@dataclasses.dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: int = 0  # tokens so far (completion_tokens is set once the choice finishes)

    def add(self, chunk: Chunk) -> None:
        self.generated += len(chunk.token_ids)
        self.text += chunk.text
        self.logprobs += chunk.logprobs
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.prompt_tokens, self.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens


class Tokens:
    """Token ids -> their text, as logprobs show them (each token decoded alone)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __call__(self, token_id: int) -> str:
        return self._tok.decode([token_id]) if self._tok is not None else f"<{token_id}>"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(choices: list[Choice], prompt_tokens: list[int]) -> dict:
    """Each prompt counted once (n choices of a prompt share it), every choice's tokens counted."""
    return usage(sum(prompt_tokens), sum(c.completion_tokens for c in choices))


# ---- /v1/completions ----------------------------------------------------------------------------

def completion_logprobs(lps: list[TokenLogprobs], tokens: Tokens, offset: int, top: int) -> dict:
    """The legacy layout: parallel lists of tokens, their logprobs, the top alternatives and text offsets."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = tokens(lp.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({tokens(t): v for t, v in list(lp.top.items())[:top]} if top else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(rid: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


# ---- /v1/chat/completions -----------------------------------------------------------------------

def chat_logprobs(lps: list[TokenLogprobs], tokens: Tokens, top: int) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = tokens(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(entry(lp.token_id, lp.logprob),
                             top_logprobs=[entry(t, v) for t, v in list(lp.top.items())[:top]]) for lp in lps]}


def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat(rid: str, created: int, model: str, choices: list[dict], usage_: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(obj) -> bytes:
    """One server-sent event."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


DONE = sse(b"[DONE]")
