"""The edge: every prompt form and every sampling field becomes checked values here, once.

`SamplingParams` checks what a field means on its own (`top_p=1.5 must be in (0, 1]`); an `InputChecker`,
built from one engine's fixed limits (vocabulary, context, KV pool, logprob width, tokenizer), checks what
depends on them and turns text, token ids or chat messages into a `Prompt`, tokenizing and rendering the
chat template exactly once. What it returns (`CheckedRequest`) the engine, scheduler and servers trust.
Every error is a ValueError whose message starts with the field's path (`prompts[2]`, `sampling.stop[0]`,
`messages[1].role`), so each front end only maps it to its own status (gRPC INVALID_ARGUMENT, a batch
line's "error").

Defaults follow vLLM's. No jax here: the host engine imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Union

from jinfer.grammar.params import StructuredOutputs

MAX_STOP_STRINGS = 32  # OpenAI allows 4; every stop string is matched against every text delta
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_REQUEST_ID_CHARS = 256  # it is echoed in every response and written to the log
MAX_LOGIT_BIAS = 4096  # entries of one request's logit_bias
MAX_N = 128  # completions of one prompt
# Roles a chat template is written for; a template would render any other role verbatim into the prompt.
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 (or -1) means no top-k cut
    top_p: float = 1.0  # in (0, 1]
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; in [0, 1]
    repetition_penalty: float = 1.0  # > 0; divides positive (multiplies negative) logits of seen tokens
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence in the generated tokens
    seed: int | None = None  # None draws a fresh seed per request
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not emitted
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return this many top alternatives' logprobs (and the chosen token's)
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many top alternatives' (vLLM's)
    n: int = 1  # completions of the prompt (LLM.generate and the fronts run n requests that share its KV pages)
    min_tokens: int = 0  # no stop token, EOS or stop string ends the output before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); a dict is accepted
    include_stop_str_in_output: bool = False  # the matched stop string stays at the end of the text
    skip_special_tokens: bool = True  # special tokens (EOS, chat markers) are left out of the text
    structured_outputs: StructuredOutputs | None = None  # the output must match a JSON schema, regex, ...

    def __post_init__(self):
        # Accept a single string or any iterable for the sequence fields, as vLLM users write them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            try:
                object.__setattr__(self, "stop", tuple(self.stop))
            except TypeError:
                raise ValueError(f"stop={self.stop!r} must be a string or a list of strings") from None
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        for j, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{j}]={_short(s)} must be a non-empty string")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop[{j}] has {len(s)} characters; at most {MAX_STOP_STRING_CHARS}")
        try:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        except TypeError:
            raise ValueError(f"stop_token_ids={_short(self.stop_token_ids)} must be a list of integers") from None
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} entries; at most {MAX_STOP_TOKEN_IDS}")
        for j, t in enumerate(self.stop_token_ids):
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids[{j}]={_short(t)} must be a non-negative integer")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens={_short(self.max_tokens)} must be a positive integer")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={_short(self.temperature)} must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k={_short(self.top_k)} must be an integer >= 0 (or -1 for no cut)")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={_short(self.top_p)} must be in (0, 1]")
        if not _is_finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={_short(self.min_p)} must be in [0, 1]")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={_short(self.repetition_penalty)} must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_finite(v) or not -2 <= v <= 2:
                raise ValueError(f"{name}={_short(v)} must be in [-2, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name}={_short(v)} must be an integer >= 0")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed={_short(self.seed)} must be an integer in [0, 2**32)")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={_short(self.ignore_eos)} must be true or false")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n={_short(self.n)} must be an integer in [1, {MAX_N}]")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={_short(self.min_tokens)} must be an integer in "
                             f"[0, max_tokens={self.max_tokens}]")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={_short(getattr(self, name))} must be true or false")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.structured_outputs is not None:
            try:
                object.__setattr__(self, "structured_outputs", StructuredOutputs.of(self.structured_outputs))
            except (ValueError, TypeError) as e:
                names = {f.name for f in dataclasses.fields(StructuredOutputs)}
                sep = "." if str(e).split(" ")[0].split("[")[0] in names else ": "
                raise ValueError(f"structured_outputs{sep}{e}") from None


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """{token id: bias} (JSON object keys may be numeric strings, as OpenAI clients send them) or (id, bias)
    pairs -> pairs sorted by id; biases in [-100, 100] as OpenAI's."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [tuple(kv) for kv in items]
    except TypeError:
        raise ValueError(f"logit_bias={_short(value)} must map token ids to numbers") from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS}")
    out = {}
    for kv in pairs:
        if len(kv) != 2:
            raise ValueError(f"logit_bias={_short(value)} must map token ids to numbers")
        k, v = kv
        key = int(k) if isinstance(k, str) and k.strip().isdigit() else k
        if not _is_int(key) or key < 0:
            raise ValueError(f"logit_bias: the key {_short(k)} must be a token id (a non-negative integer)")
        if not _is_finite(v) or not -100 <= v <= 100:
            raise ValueError(f"logit_bias[{key}]={_short(v)} must be a number in [-100, 100]")
        out[int(key)] = float(v)
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A checked prompt: token ids within the vocabulary, fewer than the context."""

    ids: tuple[int, ...]
    text: str | None = None  # the text it came from (a chat: the rendered template); None for token ids


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    """A prompt and sampling parameters that fit the engine they were checked for."""

    prompt: Prompt
    sampling: SamplingParams
    grammar: str | None = None  # sampling.structured_outputs compiled for the engine's tokenizer


PromptInput = Union[str, Sequence[int], Prompt]


class InputChecker:
    """Checks inputs against one engine's fixed limits. `tokenizer` may be None (token ids only)."""

    def __init__(self, *, vocab_size: int, max_model_len: int, max_logprobs: int, usable_pages: int,
                 page_size: int, tokenizer=None, eos_token_ids: Sequence[int] = ()):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.usable_pages = usable_pages
        self.page_size = page_size
        self.tokenizer = tokenizer
        self._eos_token_ids = tuple(eos_token_ids)
        self._grammars = None

    @property
    def grammars(self):
        """The GrammarCompiler of this engine's tokenizer and vocabulary (built on first use)."""
        if self._grammars is None:
            from jinfer.grammar.matcher import GrammarCompiler  # llguidance loads only where a grammar is asked

            self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.vocab_size, self._eos_token_ids)
        return self._grammars

    # ---- prompts -------------------------------------------------------------------------------

    def prompt(self, prompt: PromptInput, field: str = "prompt") -> Prompt:
        """Text (tokenized here, with the tokenizer's BOS) or token ids -> a Prompt."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{field} is an empty string")
            return self._fit(field, self.require_tokenizer(field).encode(prompt), prompt)
        if isinstance(prompt, (bytes, Mapping)) or not isinstance(prompt, Sequence):
            raise ValueError(f"{field} must be a string or a list of token ids, not {type(prompt).__name__}")
        return self._fit(field, self.token_ids(prompt, field), None)

    def chat(self, messages, field: str = "messages") -> Prompt:
        """A conversation [{'role', 'content'}, ...] rendered with the model's chat template, ready for the
        assistant's turn, as a prompt that fits the context."""
        text, ids = self.render_chat(messages, field)
        return self._fit(field, ids, text)

    def render_chat(self, messages, field: str = "messages") -> tuple[str, list[int]]:
        """The rendered template and its ids, of any length. The template writes its own BOS, so the
        tokenizer adds none."""
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise ValueError(f"{field} must be a non-empty list of {{'role': str, 'content': str}} objects")
        if not messages:
            raise ValueError(f"{field} is empty")
        checked = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"{field}[{i}] must be an object with 'role' and 'content', not {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role:
                raise ValueError(f"{field}[{i}].role is empty" if role in (None, "")
                                 else f"{field}[{i}].role must be a string")
            if role not in CHAT_ROLES:
                raise ValueError(f"{field}[{i}].role={_short(role)} is not one of {list(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"{field}[{i}].content must be a string")
            checked.append({"role": role, "content": content})
        tok = self.require_tokenizer(field)
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{field}: this model has no chat_template; send text or token ids")
        try:
            text = tok.apply_chat_template(checked, add_generation_prompt=True)
        except Exception as e:
            raise ValueError(f"{field}: the chat template refused the messages: {e}") from None
        return text, tok.encode(text, add_special_tokens=False)

    def token_ids(self, ids, field: str = "token_ids") -> list[int]:
        """Ids within the vocabulary (any length; a prompt's length is checked by `prompt`)."""
        V = self.vocab_size
        out = []
        for j, t in enumerate(ids):
            if not _is_int(t) or not 0 <= t < V:
                raise ValueError(f"{field}[{j}]={_short(t)} is not a token id in the vocabulary [0, {V})")
            out.append(int(t))
        return out

    def text(self, value, field: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{field} must be a string, not {type(value).__name__}")
        return value

    # ---- sampling ------------------------------------------------------------------------------

    def sampling(self, sampling: SamplingParams | Mapping | None, field: str | None = None) -> SamplingParams:
        """SamplingParams, or a mapping of its fields (JSON, a proto's set fields), checked against the
        vocabulary and the logprob width. `field` prefixes every message (`sampling.top_p=...`)."""
        prefix = f"{field}." if field else ""
        if sampling is None:
            return SamplingParams()
        if isinstance(sampling, Mapping):
            unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
            if unknown:
                raise ValueError(f"{prefix}{unknown[0]} is not a sampling field; expected one of "
                                 f"{list(SAMPLING_FIELDS)}")
            try:
                sampling = SamplingParams(**sampling)
            except ValueError as e:
                raise ValueError(f"{prefix}{e}") from None
        elif not isinstance(sampling, SamplingParams):
            raise ValueError(f"{field or 'sampling'} must be a SamplingParams, not {type(sampling).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(sampling, name)
            if v is not None and v > self.max_logprobs:
                raise ValueError(f"{prefix}{name}={v} exceeds the engine's max_logprobs={self.max_logprobs}")
        for j, t in enumerate(sampling.stop_token_ids):
            if t >= self.vocab_size:
                raise ValueError(f"{prefix}stop_token_ids[{j}]={t} is not a token id in the vocabulary "
                                 f"[0, {self.vocab_size})")
        for t, _ in sampling.logit_bias:
            if t >= self.vocab_size:
                raise ValueError(f"{prefix}logit_bias[{t}]: {t} is not a token id in the vocabulary "
                                 f"[0, {self.vocab_size})")
        return sampling

    def grammar(self, sampling: SamplingParams, field: str | None = None) -> str | None:
        """sampling.structured_outputs compiled for this engine (None without one); ValueError names the field."""
        if sampling.structured_outputs is None:
            return None
        prefix = f"{field}." if field else ""
        if self.tokenizer is None:
            raise ValueError(f"{prefix}structured_outputs: this model has no tokenizer, which a grammar needs")
        from jinfer.grammar.matcher import UnsupportedTokenizer

        try:
            return self.grammars.compile(sampling.structured_outputs)
        except UnsupportedTokenizer as e:
            raise ValueError(f"{prefix}structured_outputs: {e}") from None
        except ValueError as e:
            raise ValueError(f"{prefix}structured_outputs.{e}") from None

    # ---- whole requests ------------------------------------------------------------------------

    def request(self, prompt: PromptInput, sampling: SamplingParams | Mapping | None = None,
                field: str = "prompt", sampling_field: str | None = None) -> CheckedRequest:
        """A prompt and its sampling, and that the KV pool can hold it: a request that could never fit
        is refused here rather than waiting forever for pages."""
        p = self.prompt(prompt, field)
        sp = self.sampling(sampling, sampling_field)
        longest = min(len(p.ids) + sp.max_tokens, self.max_model_len)
        pages = -(-longest // self.page_size)
        if pages > self.usable_pages:
            raise ValueError(f"{field} ({len(p.ids)} tokens) + max_tokens={sp.max_tokens} needs {pages} KV pages; "
                             f"the pool has {self.usable_pages} (of {self.page_size} tokens each)")
        return CheckedRequest(p, sp, self.grammar(sp, sampling_field))

    # ---- helpers -------------------------------------------------------------------------------

    def require_tokenizer(self, field: str):
        if self.tokenizer is None:
            raise ValueError(f"{field}: this model has no tokenizer; send token ids")
        return self.tokenizer

    def _fit(self, field: str, ids: list[int], text: str | None) -> Prompt:
        if not ids:
            raise ValueError(f"{field} has no tokens")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{field} has {len(ids)} tokens; the context is {self.max_model_len} and at least "
                             "one position must remain for generation")
        return Prompt(tuple(ids), text)


def completions(request: CheckedRequest, n: int | None = None) -> list[CheckedRequest]:
    """The n completions of a request (default: its sampling.n) as requests of one completion each: seeded ones
    get seeds seed, seed + 1, ... so that they differ yet repeat."""
    sp = request.sampling
    n = sp.n if n is None else n
    return [dataclasses.replace(request, sampling=dataclasses.replace(
        sp, n=1, seed=sp.seed + j if sp.seed is not None else None)) for j in range(n)]


def check_request_id(request_id, field: str = "request_id") -> str:
    """A caller's name for its request: printable and short, since it is echoed and logged."""
    if not isinstance(request_id, str):
        raise ValueError(f"{field} must be a string, not {type(request_id).__name__}")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"{field} has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        raise ValueError(f"{field}={_short(request_id)} has unprintable characters")
    return request_id


def _short(value, limit: int = 64) -> str:
    """repr() of a bad value for an error message, cut so that a huge input cannot flood a log."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy integers too


def _is_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
