"""Messages in and out: jinfer.v1 protos <-> checked requests (jinfer.inputs), engine chunks and model info.

Requests are checked by the engine's InputChecker (the edge: one place for every prompt form and sampling
field); this module only maps proto fields onto it, so a bad request raises ValueError whose message starts
with the proto field path (`sampling.top_p=1.5 must be in (0, 1]`, `chat.messages[0].role is empty`); the
servicer turns it into INVALID_ARGUMENT. Everything here is a pure function of a message and the engine's
immutable parts; tokenizing may be slow on long text, so the servicer runs it off the event loop.
"""

from __future__ import annotations

from jinfer.engine.engine import Engine
from jinfer.inputs import CheckedRequest, InputChecker, Prompt, check_request_id
from jinfer.serve.engine_thread import Chunk
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "cancelled": pb.FINISH_REASON_CANCELLED}


# ---- requests ------------------------------------------------------------------------------------

def sampling_fields(msg: pb.SamplingParams) -> dict:
    """The fields the client set (unset ones take SamplingParams' defaults), as SamplingParams keywords.
    Not json_format.MessageToDict: it writes int64 (seed) as a string and inf as "Infinity"."""
    fields = {}
    for f, v in msg.ListFields():
        if f.name == "logit_bias":
            v = dict(v)
        elif f.name == "structured_outputs":
            v = structured_fields(v)
        elif f.is_repeated:
            v = tuple(v)
        fields[f.name] = v
    return fields


def structured_fields(msg: pb.StructuredOutputs) -> dict:
    """The StructuredOutputs keyword of the message's one set field ({} when none is: the edge refuses it)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        return {}
    v = getattr(msg, kind)
    return {kind: tuple(v.values) if kind == "choice" else v}


def chat_prompt(inputs: InputChecker, msg: pb.Chat, field: str) -> Prompt:
    return inputs.chat([{"role": m.role, "content": m.content} for m in msg.messages], f"{field}.messages")


def request(inputs: InputChecker, req: pb.GenerateRequest) -> CheckedRequest:
    """The request's prompt (tokenized or rendered here) and sampling, checked against the engine."""
    check_request_id(req.request_id)
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is not set: give one of text, token_ids or chat")
    if kind == "text":
        prompt = inputs.prompt(req.text, field="text")
    elif kind == "token_ids":
        prompt = inputs.prompt(list(req.token_ids.ids), field="token_ids.ids")
    else:
        prompt = chat_prompt(inputs, req.chat, "chat")
    checked = inputs.request(prompt, sampling_fields(req.sampling), field=kind, sampling_field="sampling")
    if checked.sampling.n != 1:
        raise ValueError(f"sampling.n={checked.sampling.n}: Generate streams one completion; send n requests (with "
                         "seeds seed, seed + 1, ...) or use the HTTP front's n")
    return checked


def tokenize(inputs: InputChecker, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
    kind = req.WhichOneof("input")
    if kind is None:
        raise ValueError("input is not set: give text or chat")
    if kind == "chat":
        text, ids = inputs.render_chat([{"role": m.role, "content": m.content} for m in req.chat.messages],
                                       "chat.messages")
        return pb.TokenizeResponse(token_ids=ids, text=text)
    if inputs.tokenizer is None:
        raise ValueError("text: this model has no tokenizer; send token ids")
    add = req.add_special_tokens if req.HasField("add_special_tokens") else True
    return pb.TokenizeResponse(token_ids=inputs.tokenizer.encode(req.text, add_special_tokens=add), text=req.text)


def detokenize(inputs: InputChecker, req: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
    if inputs.tokenizer is None:
        raise ValueError("token_ids: this model has no tokenizer")
    ids = inputs.token_ids(req.token_ids, "token_ids")
    return pb.DetokenizeResponse(text=inputs.tokenizer.decode(ids, skip_special_tokens=not req.keep_special_tokens))


# ---- responses -----------------------------------------------------------------------------------

def response(request_id: str, chunk: Chunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=chunk.token_ids, text=chunk.text)
    for lp in chunk.logprobs:
        msg.logprobs.append(pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()]))
    for tok, lp, top in chunk.prompt_logprobs:
        msg.prompt_logprobs.append(pb.PromptLogprob(
            token_id=tok, logprob=lp.logprob, rank=lp.rank, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top]))
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
    # Usable pages (page 0 is reserved), summed over data-parallel replicas: the pool jinfer_kv_pages_total counts.
    num_pages = sum(r.scheduler.allocator.usable_pages for r in getattr(engine, "replicas", (engine,)))
    limits = pb.EngineLimits(
        max_slots=e.max_slots, max_waiting=e.max_waiting, page_size=e.page_size, num_pages=num_pages,
        max_prefill_chunk=e.max_prefill_chunk, token_buckets=list(e.token_buckets), max_logprobs=e.max_logprobs,
        dtype=e.dtype, prefix_caching=e.enable_prefix_caching, decode_buckets=list(e.decode_buckets),
        decode_steps=e.decode_steps)
    tok = engine.tokenizer
    return pb.ModelInfo(model=model_name, config=config, max_context=engine.max_model_len, limits=limits,
                        has_tokenizer=tok is not None,
                        has_chat_template=bool(getattr(tok, "chat_template", None)),
                        max_message_bytes=max_message_bytes)
