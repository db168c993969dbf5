"""One request's output as it streams: incremental detokenizer, stop strings, logprobs and timings.

The engine feeds it each token the scheduler recorded (`add_token`) and, once the request has ended,
asks for the held-back tail (`finish`). Stop strings are matched here, on detokenized text; a match
sets `stopped`, and the engine then ends the request in the scheduler. Prompt logprobs, when asked for, come
with the first token: the step that samples it computes the prompt's last position, so by then every entry
has reached the host.
"""

from __future__ import annotations

from jinfer.engine.outputs import Logprob, PromptLogprobs, RequestMetrics, RequestOutput, TokenLogprobs
from jinfer.engine.request import Request
from jinfer.engine.stop_strings import StopStringMatcher
from jinfer.inputs import CheckedRequest
from jinfer.text.detokenizer import IncrementalDetokenizer


class OutputStream:
    def __init__(self, request_id: str, checked: CheckedRequest, arrival_time: float, tokenizer=None):
        sampling = checked.sampling
        self.output = RequestOutput(checked.prompt.text, list(checked.prompt.ids), [], "", None,
                                    request_id=request_id, logprobs=[] if sampling.logprobs is not None else None,
                                    metrics=RequestMetrics(arrival_time=arrival_time))
        # No tokenizer (token ids in and out, as for random-weight benchmarks): no text, no stop strings.
        self._tokenizer = tokenizer
        self._detok = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, skip_special_tokens=sampling.skip_special_tokens)
        self._stops = StopStringMatcher(sampling.stop, include=sampling.include_stop_str_in_output)

    @property
    def stopped(self) -> bool:
        """A stop string has matched: the request must end, whatever the scheduler thinks."""
        return self._stops.stopped

    def add_token(self, req: Request, index: int) -> str:
        """Records the request's output token `index` (the engine passes each in turn); returns the text now
        safe to emit."""
        out, tok = self.output, req.output_ids[index]
        out.token_ids.append(tok)
        m = out.metrics
        m.token_times.append(req.token_times[index])
        if m.first_token_time is None:
            m.first_token_time = req.token_times[index]
        if req.spec is not None:
            m.spec_draft_tokens, m.spec_accepted_tokens, m.spec_verify_steps = (
                req.spec.drafted, req.spec.accepted, req.spec.steps)
        if index == 0 and req.sampling.prompt_logprobs is not None:
            out.prompt_logprobs = self._prompt_logprobs(req)
        if out.logprobs is not None and req.logprobs:
            lp, ids, vals = req.logprobs[index]
            n = req.sampling.logprobs
            out.logprobs.append(TokenLogprobs(tok, lp, {int(i): float(v) for i, v in zip(ids[:n], vals[:n])}))
        # A stop token's text is not emitted (unless asked for, as vLLM's include_stop_str_in_output).
        ended_by_token = (req.finished and req.finish_reason == "stop" and index == len(req.output_ids) - 1
                          and tok in req.stop_ids)
        if self._detok is None or (ended_by_token and not req.sampling.include_stop_str_in_output):
            return ""
        # A stop string ends the output only once min_tokens are out (vLLM's rule, as for stop tokens).
        return self._stops.feed(self._detok.push(tok), armed=index + 1 >= req.sampling.min_tokens)

    def _prompt_logprobs(self, req: Request) -> PromptLogprobs:
        """vLLM's layout: None for the first prompt token, then per token a dict of the token itself (with
        its rank in the whole vocabulary) and the position's top n."""
        n = req.sampling.prompt_logprobs
        entries: PromptLogprobs = [None]
        for p, (lp, rank, ids, vals) in enumerate(req.prompt_logprobs):
            tok = req.prompt_ids[p + 1]
            d = {tok: Logprob(lp, rank, self._decode(tok))}
            for r, (i, v) in enumerate(zip(ids[:n].tolist(), vals[:n].tolist())):
                if i not in d:
                    d[i] = Logprob(v, r + 1, self._decode(i))
            entries.append(d)
        return entries

    def _decode(self, token_id: int) -> str | None:
        return None if self._tokenizer is None else self._tokenizer.decode([token_id])

    def finish(self, req: Request) -> str:
        """The held-back text of an ended request; fills in its finish reason and timings."""
        delta = ""
        if self._detok is not None and not self._stops.stopped:
            delta = self._stops.feed(self._detok.flush()) + self._stops.flush()
        out = self.output
        out.finish_reason = req.finish_reason
        if self._stops.matched is not None:
            out.stop_reason = self._stops.matched
        elif req.finish_reason == "stop" and req.output_ids and req.output_ids[-1] in req.sampling.stop_token_ids:
            out.stop_reason = req.output_ids[-1]
        out.num_cached_tokens = req.num_cached_prompt
        out.metrics.finished_time = req.token_times[-1]
        return delta
