"""The tokenizer a GGUF file carries: llama.cpp's vocabulary metadata -> a `jinfer.text.tokenizer.Tokenizer`.

llama.cpp writes the vocabulary as `tokenizer.ggml.*` metadata: the tokens, their types, BPE merges
(byte-level 'gpt2' vocabularies) or scores (SentencePiece 'llama' ones), the pre-tokenizer's name and the
BOS/EOS ids. This module rebuilds the same tokenizer as a Hugging Face `tokenizers` pipeline, following
llama.cpp (GGUF's home) where it and transformers' GGUF reader disagree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.gguf_import import gguf_fields, open_gguf
from jinfer.text.tokenizer import Tokenizer

# llama.cpp's token types (gguf.TokenType).
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6

# Pre-tokenizer regexes, as in the upstream tokenizer.json files; llama.cpp applies the same ones.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied one after another, each cutting every piece into matches and the
# gaps between them, as llama.cpp's unicode_regex_split does; ignore_merges; add_bos default). The names
# and groups follow llama.cpp's llama_vocab::load. A missing name is llama.cpp's 'default'.
_DEFAULT = ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False)
_PRE_FAMILIES = {
    ("default",): _DEFAULT,
    ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "roberta-bpe"): ((_GPT2,), False, False),
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"):
        ((r"\p{N}", _GPT2), False, False),
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"):
        ((_LLAMA3,), True, True),
    ("dbrx", "smaug-bpe"): ((_LLAMA3,), False, False),
    ("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez"): ((_QWEN2,), False, False),
    ("tekken",): ((_TEKKEN,), True, True),
    ("gpt-4o", "llama4"): ((_GPT4O,), False, False),
}
_PRE = {name: spec for names, spec in _PRE_FAMILIES.items() for name in names}


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """Reads the tokenizer.* metadata of a GGUF file (not its tensors)."""
    return tokenizer_from_gguf_fields(gguf_fields(open_gguf(path)))


def tokenizer_from_gguf_fields(fields: dict) -> Tokenizer:
    """`fields`: GGUF metadata keys -> plain Python values (as `gguf_import.gguf_fields` gives)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise CheckpointError(
            f"tokenizer.ggml.tokens must be a non-empty list of strings, got {type(tokens).__name__}")
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = _vocab(tokens)
    if kind == "gpt2":
        backend, add_bos_default = _byte_level_backend(fields, vocab)
    elif kind == "llama":
        backend, add_bos_default = _sentencepiece_backend(fields, tokens, types, vocab), True
    else:
        raise CheckpointError(f"tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2', 'llama'")
    # Control and unknown tokens become special tokens, user-defined ones plain added tokens: both
    # are matched whole in the input text and never cut by BPE, as llama.cpp does.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty in (_UNKNOWN, _CONTROL)])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
        i = fields.get(key)
        if i is None:
            return None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise CheckpointError(f"{key}={i!r} is not a token id in [0, {len(tokens)})")
        return tokens[i]

    extra = [t for t in (token("tokenizer.ggml.eot_token_id"), token("tokenizer.ggml.eom_token_id")) if t]
    return Tokenizer(backend, bos_token=token("tokenizer.ggml.bos_token_id"),
                     eos_token=token("tokenizer.ggml.eos_token_id"),
                     chat_template=fields.get("tokenizer.chat_template"),
                     add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                     add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                     extra_eos_tokens=extra)


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise CheckpointError(f"tokenizer.ggml.tokens[{i}] must be a str, got {type(t).__name__}")
        if t in vocab:
            raise CheckpointError(f"tokenizer.ggml.tokens[{i}]={t!r} repeats tokenizer.ggml.tokens[{vocab[t]}]")
        vocab[t] = i
    return vocab


def _byte_level_backend(fields: dict, vocab: dict[str, int]) -> tuple[Backend, bool]:
    """GPT-2 style BPE over UTF-8 bytes spelled as printable characters; returns (backend, add_bos default)."""
    pre_name = fields.get("tokenizer.ggml.pre") or "default"
    if pre_name not in _PRE:
        raise CheckpointError(f"tokenizer.ggml.pre={pre_name!r} is not supported; supported: {sorted(_PRE)}")
    regexes, ignore_merges, add_bos_default = _PRE[pre_name]
    merges = [_split_merge(m, i) for i, m in enumerate(fields.get("tokenizer.ggml.merges") or ())]
    backend = Backend(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(regexes)
    backend.decoder = decoders.ByteLevel()
    return backend, add_bos_default


def _sentencepiece_backend(fields: dict, tokens, types, vocab: dict[str, int]) -> Backend:
    """SentencePiece BPE (Llama 2, Mistral): pieces with scores, '▁' for a space, <0xXX> byte fallback."""
    scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    if len(scores) != len(tokens):
        raise CheckpointError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    backend = Backend(models.BPE(vocab, _sentencepiece_merges(tokens, scores, types, vocab),
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    # add_space_prefix puts a '▁' before the text and, as llama.cpp does, after every special token;
    # decoding removes the first one again.
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581")] * prefix + [normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * prefix)
    return backend


def _split_merge(merge: str, i: int) -> tuple[str, str]:
    pos = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
    if pos < 0:
        raise CheckpointError(f"tokenizer.ggml.merges[{i}]={merge!r} is not two tokens separated by a space")
    return merge[:pos], merge[pos + 1:]


def _byte_level_pre_tokenizer(regexes: Sequence[str]):
    if regexes == (_GPT2,):  # the GPT-2 split is built into the byte-level step
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if regexes == (r"\p{N}", _GPT2):  # the upstream spelling of StarCoder/SmolLM's pre-tokenizer
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _sentencepiece_merges(tokens, scores, types, vocab) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece has the highest score. As BPE merges
    that is every split of a piece into two vocabulary pieces, ranked by the joined piece's score."""
    ranked = []
    for i, (t, score, ty) in enumerate(zip(tokens, scores, types)):
        if ty in (_UNKNOWN, _CONTROL, _BYTE) or len(t) < 2:
            continue
        ranked.extend((-float(score), i, k, t[:k], t[k:]) for k in range(1, len(t))
                      if t[:k] in vocab and t[k:] in vocab)
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]
