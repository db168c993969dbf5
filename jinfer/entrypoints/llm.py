"""`LLM`: the notebook API. Loads a model once, then `generate`, `stream` and `chat` over it.

Requests run through the continuous-batching engine (`jinfer.engine.engine`); `jinfer.runtime.reference` keeps the
simple dense-cache loop as the oracle the engine is tested against.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp

from jinfer.engine.outputs import RequestOutput
from jinfer.inputs import CheckedRequest, Prompt, PromptInput, SamplingParams, completions

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={d} is not one of {sorted(DTYPES)}")
    return d


class LLM:
    """A model plus an engine. `model` is anything `checkpoints.load.load` takes, or a LoadedModel already in
    memory; `engine_config` sets slots, pages, buckets (see EngineConfig); `quantization` ("int8", "int4",
    "fp8") quantizes the layers' matmul weights at load, by round to nearest (`quantization_group_size`:
    inputs per scale, None for the format's default), as EngineConfig's fields of the same names; "gguf"
    keeps a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks as they are. A checkpoint stored quantized (`jinfer quantize`,
    an imported AWQ / GPTQ / compressed-tensors model) loads as it is stored, with no `quantization`.
    `kv_cache_dtype` ("int8", "fp8" or "fp8_e4m3", "auto") stores the KV cache in 8 bits with a scale per
    token and head (EngineConfig's field of that name); it combines with any weight quantization.
    `speculative_config` (vLLM's dict: {"method": "ngram" | "draft" | "early_exit", "num_speculative_tokens": k,
    ...}; `jinfer.engine.spec.config.SpeculativeConfig` lists the keys) turns on speculative decoding; for
    "draft", its "model" is loaded as the target is (or given as a LoadedModel)."""

    def __init__(self, model="smollm2", dtype="float32", engine_config=None, seed: int | None = None,
                 warmup: bool = True, quantization: str | None = None, quantization_group_size: int | None = None,
                 kv_cache_dtype: str | None = None, speculative_config=None):
        from jinfer.checkpoints.load import LoadedModel, load
        from jinfer.engine.config import EngineConfig
        from jinfer.runtime.build import make_engine

        self.dtype = resolve_dtype(dtype)
        engine_config = engine_config or EngineConfig(dtype=str(self.dtype))
        if jnp.dtype(engine_config.dtype) != self.dtype:
            engine_config = dataclasses.replace(engine_config, dtype=str(self.dtype))
        given = {k: v for k, v in (("quantization", quantization), ("quantization_group_size", quantization_group_size),
                                   ("kv_cache_dtype", kv_cache_dtype), ("speculative", speculative_config))
                 if v is not None}
        engine_config = dataclasses.replace(engine_config, **given)  # what engine_config says, unless given here
        loaded = model if isinstance(model, LoadedModel) else load(model, quantization=engine_config.quantization)
        if loaded.quantization is not None and engine_config.quantization is not None:
            raise ValueError(f"quantization={engine_config.quantization!r} was asked for, but the checkpoint is "
                             f"stored quantized ({loaded.quantization}); load it without quantization")
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        spec = engine_config.speculative
        draft = None
        if spec is not None and spec.method == "draft":
            d = spec.model if isinstance(spec.model, LoadedModel) else load(spec.model)
            draft = (d.config, d.params)
        self.engine = make_engine(loaded.config, loaded.params, loaded.tokenizer, engine_config, seed=seed,
                                  draft_model=draft)
        self.eos_token_ids = self.engine.eos_token_ids
        if warmup:
            self.engine.warmup()

    def _check(self, prompts, sampling_params) -> list[CheckedRequest]:
        """Every prompt and sampling checked (text tokenized once) before any is queued, so a bad one leaves
        nothing half-submitted."""
        single = isinstance(prompts, (str, Prompt)) or (
            isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (str, list, tuple, Prompt)))
        if single:
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        inputs = self.engine.inputs
        return [inputs.request(p, sp, field=f"prompts[{i}]",
                               sampling_field=f"sampling_params[{i}]" if len(prompts) > 1 else None)
                for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    def _submit(self, requests: list[CheckedRequest]) -> list[list[str]]:
        """Queues each request's n completions (seeded ones get seeds seed, seed + 1, ...; the later ones share
        the first's prompt pages); -> per request, its completions' engine ids."""
        ids: list[list[str]] = []
        try:
            for r in requests:
                group = []
                for copy in completions(r):
                    group.append(self.engine.add_request(copy, same_prompt_as=group[0] if group else None))
                ids.append(group)
        except BaseException:
            for rid in (i for g in ids for i in g):
                self.engine.cancel(rid)
            raise
        return ids

    def generate(self, prompts: PromptInput | Sequence[PromptInput], sampling_params=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; with SamplingParams.n > 1 its `outputs` hold the n completions."""
        groups = self._submit(self._check(prompts, sampling_params))
        ids = [i for g in groups for i in g]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while len(results) < len(ids):
                for ev in self.engine.step():
                    if ev.output.finished:
                        results[ev.request_id] = ev.output
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.cancel(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [_merged([results[i] for i in g]) for g in groups]

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the generated text in deltas as the tokens arrive."""
        for delta, _ in self.stream_outputs(prompt, sampling_params):
            if delta:
                yield delta

    def stream_outputs(self, prompt: PromptInput, sampling_params: SamplingParams | None = None
                       ) -> Iterator[tuple[str, RequestOutput]]:
        """Yields (text delta, the cumulative RequestOutput) as tokens arrive; the last has its finish_reason."""
        checked = self._check([prompt], sampling_params)
        if checked[0].sampling.n != 1:
            raise ValueError(f"sampling_params.n={checked[0].sampling.n}: a stream yields one completion; use generate")
        ((rid,),) = self._submit(checked)
        done = False
        try:
            while not done:
                for ev in self.engine.step():
                    if ev.request_id == rid:
                        done = ev.output.finished
                        yield ev.text_delta, ev.output
        finally:
            if not done:
                self.engine.cancel(rid)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation ([{'role': ..., 'content': ...}, ...]) or a list of them -> the assistant's replies,
        one RequestOutput per conversation (vLLM's LLM.chat). `sampling_params`: one for all, or one each."""
        many = isinstance(messages, (list, tuple)) and bool(messages) and all(
            isinstance(m, (list, tuple)) for m in messages)
        conversations = list(messages) if many else [messages]
        prompts = [self.engine.inputs.chat(c, f"messages[{i}]" if many else "messages")
                   for i, c in enumerate(conversations)]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def get_tokenizer(self):
        """The model's tokenizer (jinfer.text.tokenizer.Tokenizer: encode, decode, apply_chat_template)."""
        return self.tokenizer

    def chat_prompt(self, messages: list[dict]) -> Prompt:
        """The conversation rendered with the model's chat template (`.text`) and its token ids (`.ids`)."""
        return self.engine.inputs.chat(messages)


def _merged(outputs: list[RequestOutput]) -> RequestOutput:
    """n completions of one prompt as one RequestOutput: the first's flat fields, all n in `outputs`."""
    if len(outputs) == 1:
        return outputs[0]
    return dataclasses.replace(outputs[0], completions=outputs)
