"""OpenAI-style request bodies (`/v1/completions`, `/v1/chat/completions`) -> checked engine requests.

The edge (`jinfer.inputs.InputChecker`) checks every prompt and sampling field, as it does for gRPC; this module
maps the OpenAI names onto it (`max_completion_tokens` -> max_tokens, `logprobs` / `top_logprobs`, content parts,
`response_format` and vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` /
`structured_outputs` -> SamplingParams.structured_outputs, vLLM's extra fields `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `stop_token_ids`, `ignore_eos`, ...) and turns each
refusal into an `ApiError` whose `param` names the body's field, as OpenAI's error objects do. Unknown fields
are refused rather than silently ignored (a misspelt `temprature` would otherwise sample at 1.0).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from jinfer.inputs import MAX_N, CheckedRequest, InputChecker, completions

# OpenAI / vLLM body field -> SamplingParams field, for the fields that are the same thing under either name.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop",
             "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "logit_bias": "logit_bias",
             "min_tokens": "min_tokens", "include_stop_str_in_output": "include_stop_str_in_output",
             "skip_special_tokens": "skip_special_tokens"}
# Body fields that constrain the output (one at most) -> the StructuredOutputs field they set.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_COMMON = {"model", "n", "stream", "stream_options", "user", "max_tokens", "response_format", "structured_outputs",
           *_GUIDED, *_SAMPLING}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


class ApiError(Exception):
    """An OpenAI error object: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param)


def param_of(message: str) -> str | None:
    """The field a checker message starts with (`temperature=-1 must be ...`, `messages[0].role is empty`)."""
    m = re.match(r"[A-Za-z_][\w.\[\]]*", message)
    return m.group(0) if m else None


@dataclasses.dataclass(frozen=True)
class Parsed:
    """One body's engine requests (prompt-major: choice index = prompt * n + j) and how to answer it."""

    requests: tuple[CheckedRequest, ...]
    n: int  # choices per prompt
    stream: bool
    include_usage: bool
    continuous_usage: bool  # stream_options.continuous_usage_stats (vLLM's): each chunk carries its usage so far
    logprobs: int | None  # top alternatives per token to report; None: no logprobs
    echo: bool  # completions: the prompt's text before each choice's


def _object(body) -> Mapping:
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object", None)
    return body


def _unknown(body: Mapping, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"{unknown[0]} is not a supported field (supported: {sorted(known)})", unknown[0])


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name}={v!r} must be true or false", name)
    return v


def _int(body: Mapping, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(f"{name}={v!r} must be an integer {bound}", name)
    return v


def _structured(body: Mapping) -> tuple[dict | None, str | None]:
    """The body's output constraint as StructuredOutputs fields, and the body field that gave it."""
    given = [k for k in ("response_format", "structured_outputs", *_GUIDED) if body.get(k) is not None]
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad('response_format must be {"type": "text" | "json_object" | "json_schema", ...}',
                      "response_format")
        if fmt["type"] == "text":
            given.remove("response_format")
    if len(given) > 1:
        raise bad(f"{given[1]}: give one output constraint, not {' and '.join(given)}", given[1])
    if not given:
        return None, None
    field = given[0]
    if field == "structured_outputs":
        value = body[field]
        if not isinstance(value, Mapping):
            raise bad("structured_outputs must be an object", field)
        return dict(value), field
    if field in _GUIDED:
        return {_GUIDED[field]: body[field]}, field
    if fmt["type"] == "json_object":
        return {"json_object": True}, field
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise bad("response_format.json_schema must be an object with a schema (a JSON schema object)",
                  "response_format.json_schema")
    return {"json": dict(spec["schema"])}, field


def check_model(body: Mapping, served: str) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise bad(f"model={name!r} must be a string", "model")
    if name != served:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{served}`", "model",
                       code="model_not_found")


def _sampling(body: Mapping, max_tokens: int | None, logprobs: int | None) -> dict:
    fields = {ours: body[theirs] for theirs, ours in _SAMPLING.items() if body.get(theirs) is not None}
    structured, _ = _structured(body)
    if structured is not None:
        fields["structured_outputs"] = structured
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if logprobs is not None:
        fields["logprobs"] = logprobs
    return fields


def _stream(body: Mapping) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats)."""
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False, False
    if not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(opts, Mapping) or set(opts) - {"include_usage", "continuous_usage_stats"}:
        raise bad("stream_options must be an object with include_usage", "stream_options")
    return stream, _bool(opts, "include_usage"), _bool(opts, "continuous_usage_stats")


def _check(inputs: InputChecker, prompt, sampling: dict, field: str, body: Mapping) -> CheckedRequest:
    try:
        return inputs.request(prompt, sampling, field=field)
    except ValueError as e:
        raise _refusal(str(e), body) from None


def _refusal(message: str, body: Mapping) -> ApiError:
    """A checker's message as a 400 naming the body's field (structured_outputs.* -> the field that gave it)."""
    if message.startswith("structured_outputs"):
        _, given = _structured(body)
        return bad(message, given)
    return bad(message, param_of(message))


def _fits(request: CheckedRequest, max_model_len: int, field: str) -> None:
    """vLLM's rule: the prompt and max_tokens within the context (the engine alone would stop at its end)."""
    n, m = len(request.prompt.ids), request.sampling.max_tokens
    if n + m > max_model_len:
        raise bad(f"{field}={m}: the prompt's {n} tokens and {m} new ones exceed the context of {max_model_len} "
                  "tokens", field)


def completion(inputs: InputChecker, body, served: str, max_model_len: int) -> Parsed:
    body = _object(body)
    _unknown(body, COMPLETION_FIELDS)
    check_model(body, served)
    if body.get("suffix") is not None:
        raise bad("suffix is not supported", "suffix")
    n = _int(body, "n", 1, MAX_N) or 1
    best_of = _int(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
        raise bad(f"best_of={best_of} must equal n={n} (no server-side ranking)", "best_of")
    logprobs = _int(body, "logprobs", 0, inputs.max_logprobs)
    echo = _bool(body, "echo")
    max_tokens = _int(body, "max_tokens", 1)
    stream, usage, continuous = _stream(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt is required", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt:
        prompts = [(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        for p, field in prompts:
            if not isinstance(p, (str, list)):
                raise bad(f"{field} must be a string or a list of token ids", field)
    else:
        raise bad("prompt must be a string, a list of strings, or token ids (a list of integers or of lists)",
                  "prompt")
    sampling = _sampling(body, max_tokens, logprobs)
    requests = []
    for p, field in prompts:
        checked = _check(inputs, p, sampling, field, body)
        if max_tokens is not None:
            _fits(checked, max_model_len, "max_tokens")
        requests += completions(checked, n)
    return Parsed(tuple(requests), n, stream, usage, continuous, logprobs, echo)


def _content(content, field: str) -> str:
    """A message's content: a string, or text parts (`[{"type": "text", "text": ...}]`) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{field} must be a string or a list of text parts", field)
    texts = []
    for j, part in enumerate(content):
        f = f"{field}[{j}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise bad(f"{f}.type={kind!r}: only text parts are supported", f"{f}.type")
        if not isinstance(part.get("text"), str):
            raise bad(f"{f}.text must be a string", f"{f}.text")
        texts.append(part["text"])
    return "".join(texts)


def chat(inputs: InputChecker, body, served: str, max_model_len: int) -> Parsed:
    body = _object(body)
    _unknown(body, CHAT_FIELDS)
    check_model(body, served)
    n = _int(body, "n", 1, MAX_N) or 1
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, inputs.max_logprobs)
    if top is not None and not want:
        raise bad("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (top or 0) if want else None
    max_tokens = _int(body, "max_completion_tokens", 1)
    field = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, field = _int(body, "max_tokens", 1), "max_tokens"
    stream, usage, continuous = _stream(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        checked.append({"role": m.get("role"), "content": _content(m.get("content"), f"messages[{i}].content")})
    try:
        prompt = inputs.chat(checked, "messages")
    except ValueError as e:
        raise bad(str(e), param_of(str(e))) from None
    if max_tokens is None:  # OpenAI's default: as long as the context allows
        max_tokens = max(1, max_model_len - len(prompt.ids))
    try:
        request = inputs.request(prompt, _sampling(body, max_tokens, logprobs), field="messages")
    except ValueError as e:
        raise _refusal(str(e).replace("max_tokens", field), body) from None
    _fits(request, max_model_len, field)
    return Parsed(tuple(completions(request, n)), n, stream, usage, continuous, logprobs, False)

