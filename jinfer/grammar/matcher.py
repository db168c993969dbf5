"""Structured output through llguidance: a request's `StructuredOutputs` compiled to a token grammar, and a
matcher per request that gives the tokens allowed next as a bitmask and advances on each sampled token.

llguidance rather than xgrammar or outlines-core: an MIT-licensed Rust core in one abi3 wheel with no
dependencies (xgrammar's wheel requires torch, transformers and triton), masks computed lazily per step in
tens of microseconds for a 49k vocabulary without precompiling a schema's automaton (outlines-core builds
an index per regex up front, seconds for large schemas), JSON schema, regex, choice, Lark and GBNF in one
grammar format, and maintained by the guidance team as the structured-output backend of vLLM, SGLang and
llama.cpp.

Bitmask layout (llguidance's, also vLLM's and xgrammar's): i32[ceil(V / 32)], token t allowed iff bit
t % 32 of word t // 32 is set. The device step applies it to the logits (`jinfer.runtime.sampler`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from jinfer.grammar.params import StructuredOutputs

# Compact JSON with one space after ',' and ':' and no other whitespace: free whitespace lets a small model
# emit newlines and spaces until max_tokens cuts the object short (vLLM's `disable_any_whitespace`).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class UnsupportedTokenizer(ValueError):
    """The grammar library cannot read the tokenizer (no structured output for this model)."""


class GrammarCompiler:
    """Compiles and checks grammars for one tokenizer (`tokenizer_json`: its tokenizers-library JSON) and a
    model vocabulary of `vocab_size` ids (at least the tokenizer's; ids past it are never allowed).
    Thread-safe; the tokenizer's token trie is built on first use (about 0.5 s for 49k tokens)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                try:
                    tok = llguidance.LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self._eos or None)
                except ValueError as e:
                    raise UnsupportedTokenizer(f"llguidance cannot read this model's tokenizer ({e})") from None
                if tok.vocab_size > self.vocab_size:
                    raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's "
                                     f"{self.vocab_size}")
                self._tokenizer = tok
            return self._tokenizer

    def compile(self, spec: StructuredOutputs) -> str:
        """The grammar (llguidance's format) of `spec`, checked against the tokenizer. ValueError names the
        field at fault (`json: ...`, `regex: ...`)."""
        kind = spec.kind
        try:
            if kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
            elif kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.regex)
            elif kind == "choice":
                grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, spec.choice)))
            else:
                grammar = llguidance.grammar_from("grammar", spec.grammar)
        except ValueError as e:  # JSON text that does not parse, GBNF that does not convert
            raise ValueError(f"{kind}: {e}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise ValueError(f"{kind}: {_first_line(messages[0])}")
        return grammar

    def matcher(self, grammar: str) -> TokenMatcher:
        """A fresh matcher of a grammar `compile` returned."""
        return TokenMatcher(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0))


class TokenMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._m = matcher

    def fill_mask(self, masks: np.ndarray, row: int) -> None:
        """Writes the tokens allowed next into masks[row] (masks: i32[R, mask_words(V)], C-contiguous)."""
        llg_numpy.fill_next_token_bitmask(self._m, masks, row)

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar does not allow it (the matcher is then dead)."""
        return self._m.consume_token(int(token_id))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only an end-of-sequence token)."""
        return self._m.is_stopped()


def _first_line(message: str) -> str:
    """llguidance's message on one line (it points at the spot over several)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip() and line.strip() != "^")[:500]
