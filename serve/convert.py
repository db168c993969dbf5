"""Messages in and out: jinfer.v1 protos <-> prompt ids, SamplingParams, engine chunks and model info.

Everything here is a pure function of a message and the engine's immutable parts (tokenizer, model and
engine configs), so it runs on the event loop. A bad request raises ValueError whose message starts with
the proto field path (`sampling.top_p=1.5 must be in (0, 1]`); the servicer turns it into INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses

from jinfer.engine.engine import Engine
from jinfer.inputs import SamplingParams
from jinfer.serve.engine_thread import Chunk
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb

MAX_REQUEST_ID_CHARS = 256  # it is echoed in every response and written to the log

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "cancelled": pb.FINISH_REASON_CANCELLED}
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "logprobs")


# ---- requests ------------------------------------------------------------------------------------

def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        raise ValueError(f"request_id={request_id!r} has unprintable characters")
    return request_id


def sampling_params(msg: pb.SamplingParams, max_logprobs: int) -> SamplingParams:
    kw = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}
    try:
        sp = SamplingParams(**kw, stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                            ignore_eos=msg.ignore_eos)
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None
    if sp.logprobs is not None and sp.logprobs > max_logprobs:
        raise ValueError(f"sampling.logprobs={sp.logprobs} exceeds the server's max_logprobs={max_logprobs}")
    return sp


def chat_messages(msg: pb.Chat, field: str) -> list[dict]:
    if not msg.messages:
        raise ValueError(f"{field}.messages is empty")
    out = []
    for i, m in enumerate(msg.messages):
        if not m.role:
            raise ValueError(f"{field}.messages[{i}].role is empty")
        out.append({"role": m.role, "content": m.content})
    return out


def render_chat(engine: Engine, msg: pb.Chat, field: str) -> tuple[str, list[int]]:
    """The rendered template and its ids; the template writes its own BOS (as LLM.chat_prompt)."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(f"{field}: this server's model has no tokenizer; send token_ids")
    messages = chat_messages(msg, field)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{field}: this server's model has no chat template; send text or token_ids")
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template may reject the messages in any way (jinja raise_exception)
        raise ValueError(f"{field}: the chat template refused the messages: {e}") from None
    return text, tok.encode(text, add_special_tokens=False)


def prompt_ids(engine: Engine, req: pb.GenerateRequest) -> list[int]:
    """Token ids of the request's prompt, checked against the vocabulary and the context length."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is not set: give one of text, token_ids or chat")
    if kind == "text":
        if engine.tokenizer is None:
            raise ValueError("text: this server's model has no tokenizer; send token_ids")
        _, ids = engine.encode_prompt(req.text, field="text")
    elif kind == "token_ids":
        _, ids = engine.encode_prompt(list(req.token_ids.ids), field="token_ids.ids")
    else:
        _, ids = render_chat(engine, req.chat, "chat")
        _, ids = engine.encode_prompt(ids, field="chat (rendered)")
    return ids


def token_ids_in_vocab(ids, vocab_size: int, field: str) -> list[int]:
    ids = list(ids)
    for j, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{j}]={t} is not a token id in the vocabulary [0, {vocab_size})")
    return ids


# ---- responses -----------------------------------------------------------------------------------

def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """Chunks that queued up while the client was being written to, as one (fewer, larger messages)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return dataclasses.replace(
        last, token_ids=tuple(t for c in chunks for t in c.token_ids), text="".join(c.text for c in chunks),
        logprobs=tuple(lp for c in chunks for lp in c.logprobs))


def response(request_id: str, chunk: Chunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=chunk.token_ids, text=chunk.text)
    for lp in chunk.logprobs:
        msg.logprobs.append(pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()]))
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        u = chunk.usage
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                    cached_prompt_tokens=u.cached_prompt_tokens))
    if chunk.time_to_first_token is not None:
        msg.time_to_first_token_s = chunk.time_to_first_token
    return msg


def model_info(engine: Engine, model_name: str, max_message_bytes: int) -> pb.ModelInfo:
    c, e = engine.model_config, engine.config
    config = pb.ModelConfig(
        architecture=c.architecture, vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        eos_token_ids=list(engine.eos_token_ids), rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings)
    if c.bos_token_id is not None:
        config.bos_token_id = c.bos_token_id
    limits = pb.EngineLimits(
        max_slots=e.max_slots, max_waiting=e.max_waiting, page_size=e.page_size, num_pages=engine.num_pages,
        max_prefill_chunk=e.max_prefill_chunk, token_buckets=list(e.token_buckets), max_logprobs=e.max_logprobs,
        dtype=e.dtype, prefix_caching=e.enable_prefix_caching)
    tok = engine.tokenizer
    return pb.ModelInfo(model=model_name, config=config, max_context=engine.max_model_len, limits=limits,
                        has_tokenizer=tok is not None,
                        has_chat_template=bool(getattr(tok, "chat_template", None)),
                        max_message_bytes=max_message_bytes)
