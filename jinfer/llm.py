"""`LLM`: the notebook API. Loads a model once, then `generate`, `stream` and `chat` over it.

Requests run through the dense-cache reference loop (`jinfer.reference`) in batches of up to
`max_batch` prompts; text is produced by an incremental detokenizer per request, with stop strings
matched on that text.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.outputs import RequestOutput
from jinfer.sampling_params import SamplingParams

Prompt = Union[str, Sequence[int]]

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
    def __init__(self, model: str = "smollm2", dtype="float32", max_batch: int = 8, seed: int | None = None):
        from checkpoints.load import load

        self.dtype = resolve_dtype(dtype)
        loaded = load(model)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self.dtype), loaded.params)
        self.max_batch = max_batch
        self._rng = np.random.default_rng(seed)
        # Chat models end a turn with their own token (<|im_end|>, <|eot_id|>) besides the config's EOS.
        self.eos_token_ids = tuple(sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids)))

    # ---- input checks ------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt, index: int) -> tuple[str | None, list[int]]:
        V = self.config.vocab_size
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{index}] is an empty string")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            for j, t in enumerate(ids):
                if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < V:
                    raise ValueError(f"prompts[{index}][{j}]={t!r} is not a token id in the vocabulary [0, {V})")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompts[{index}] has no tokens")
        limit = self.config.max_position_embeddings
        if len(ids) >= limit:
            raise ValueError(f"prompts[{index}] has {len(ids)} tokens; the model's context is {limit} "
                             "and at least one must remain for generation")
        return text, ids

    def _normalize(self, prompts, sampling_params):
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (str, list, tuple)))
        if single:
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        return [self._prompt_ids(p, i) for i, p in enumerate(prompts)], sampling_params

    # ---- generation --------------------------------------------------------------------------

    def _run(self, encoded, sampling_params) -> Iterator[tuple[int, str, RequestOutput]]:
        """Yields (index, text delta, output) as tokens arrive; outputs fill in as they go."""
        from jinfer import reference
        from jinfer.detokenizer import IncrementalDetokenizer
        from jinfer.stop_strings import StopStringMatcher

        for start in range(0, len(encoded), self.max_batch):
            batch = encoded[start:start + self.max_batch]
            sps = sampling_params[start:start + self.max_batch]
            outs = [RequestOutput(text, ids, [], "", None) for text, ids in batch]
            detok = [IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True) for _ in batch]
            stops = [StopStringMatcher(sp.stop) for sp in sps]
            run = reference.DenseRun(self.params, self.config, [ids for _, ids in batch], sps, self._rng,
                                     eos_token_ids=self.eos_token_ids)
            while not run.done:
                for row, token in run.step():
                    out = outs[row]
                    out.token_ids.append(token)
                    delta = stops[row].feed(detok[row].push(token))
                    if stops[row].stopped:
                        run.stop(row)
                    if not run.active[row]:
                        if not stops[row].stopped:
                            delta += stops[row].feed(detok[row].flush()) + stops[row].flush()
                        out.finish_reason = run.outputs[row].finish_reason
                    out.text += delta
                    if delta or out.finish_reason:
                        yield start + row, delta, out

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        encoded, sps = self._normalize(prompts, sampling_params)
        results: list[RequestOutput | None] = [None] * len(encoded)
        bar = None
        if use_tqdm and len(encoded) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(encoded), desc="generating", unit="req")
        for i, _, out in self._run(encoded, sps):
            if out.finish_reason and results[i] is None:
                results[i] = out
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        return results

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the generated text in deltas as the tokens arrive."""
        encoded, sps = self._normalize([prompt] if not isinstance(prompt, str) else prompt, sampling_params)
        for _, delta, _ in self._run(encoded, sps):
            if delta:
                yield delta

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One conversation ([{'role': ..., 'content': ...}, ...]) -> the assistant's reply."""
        text, ids = self.chat_prompt(messages)
        out = self.generate([ids], sampling_params, use_tqdm=False)[0]
        out.prompt = text
        return out

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The rendered template and its ids; the template writes its own BOS, so none is added."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return text, self.tokenizer.encode(text, add_special_tokens=False)
