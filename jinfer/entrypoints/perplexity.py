"""`jinfer perplexity FILE`: a model's perplexity on a text, through the engine's prompt logprobs.

The text is tokenized once and cut into consecutive, non-overlapping windows of `window` tokens (a last,
shorter window is dropped, and said so); each window is one request with `prompt_logprobs=0, max_tokens=1`,
so it is scored alone, from its own first token: every token but the first is predicted from those before
it in its window. Perplexity = exp(the mean negative log-likelihood over all predicted tokens).

The engine is fed a few windows at a time (enough to fill its slots), never the whole text at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from jinfer.engine.outputs import RequestOutput
from jinfer.inputs import SamplingParams

# Greedy, one output token, no stop token: the prompt's logprobs are the point; the token is discarded.
SCORING = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    num_scored: int  # tokens predicted: num_windows x (window - 1)
    num_windows: int
    window: int
    num_tokens: int  # of the whole text
    num_dropped: int  # tokens of the last, partial window, not scored

    def summary(self) -> str:
        dropped = (f"; the last {self.num_dropped} tokens (a partial window) dropped" if self.num_dropped
                   else "")
        return (f"perplexity {self.perplexity:.4f} (mean NLL {self.mean_nll:.4f} nats) over {self.num_scored} "
                f"scored tokens in {self.num_windows} windows of {self.window}; the text has {self.num_tokens} "
                f"tokens{dropped}")


def windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `window` tokens; a shorter tail is left out."""
    return [list(ids[i:i + window]) for i in range(0, len(ids) - window + 1, window)]


def perplexity(llm, text: str | Sequence[int], window: int = 512, progress: bool = False) -> PerplexityResult:
    """`text`: a string (tokenized with the model's tokenizer, as `tokenizer.encode` does) or token ids.
    `llm`: an `LLM` (anything with its `.engine`)."""
    engine = llm.engine
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window={window!r} must be an integer >= 2 (a window's first token is not scored)")
    if window >= engine.max_model_len:
        raise ValueError(f"window={window} must be below the engine's context of {engine.max_model_len} "
                         "tokens (one position remains for the output token)")
    if isinstance(text, str):  # of any length: only the windows must fit the context
        if engine.tokenizer is None:
            raise ValueError("text: this model has no tokenizer; give token ids")
        ids = engine.tokenizer.encode(text)
    else:
        ids = engine.inputs.token_ids(text, "text")
    chunks = windows(ids, window)
    if not chunks:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    requests = [engine.inputs.request(c, SCORING, field=f"window[{i}]") for i, c in enumerate(chunks)]
    nll = 0.0
    for out in _run(engine, requests, progress):
        nll -= sum(entries[tok].logprob for tok, entries in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]))
    scored = len(chunks) * (window - 1)
    mean = nll / scored
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, num_scored=scored, num_windows=len(chunks),
                            window=window, num_tokens=len(ids), num_dropped=len(ids) - len(chunks) * window)


def _run(engine, requests, progress: bool):
    """Yields each request's finished output (in any order), keeping about two slots' worth in the engine."""
    limit = 2 * engine.config.max_slots * engine.config.data_parallel
    todo = iter(requests)
    inflight: set[str] = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="perplexity", unit="window")
    try:
        exhausted = False
        while True:
            while not exhausted and len(inflight) < limit:
                r = next(todo, None)
                if r is None:
                    exhausted = True
                else:
                    inflight.add(engine.add_request(r))
            if not inflight:
                break
            for ev in engine.step():
                out: RequestOutput = ev.output
                if out.finished and ev.request_id in inflight:
                    inflight.discard(ev.request_id)
                    if bar:
                        bar.update(1)
                    yield out
    finally:
        for rid in inflight:
            engine.cancel(rid)
        engine.run_until_done()  # the step already dispatched for cancelled requests
        if bar:
            bar.close()
