"""Text <-> token ids, and chat templates. The Hugging Face `tokenizers` library does the BPE work.

A `Tokenizer` wraps one `tokenizers.Tokenizer` (the backend) plus what a checkpoint says around it: the
BOS/EOS tokens, whether encoding adds them, and the chat template. It is built from GGUF metadata
(`from_gguf`, `from_gguf_fields`: the vocabulary, merges and token types that llama.cpp writes) or from an
HF tokenizer directory (`from_dir`), and written back as an HF directory (`save`) that both `from_dir` and
`transformers.AutoTokenizer` read. Ids leave as plain `list[int]`; text leaves as `str`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

# llama.cpp's token types (gguf.TokenType).
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6

# Tokens that end an assistant turn in common chat formats: a chat model stops on them even where the
# checkpoint names another EOS (SmolLM2: eos <|im_end|>; Llama 3 instruct: eos <|end_of_text|>, turns end
# with <|eot_id|>). llama.cpp keeps a similar list of end-of-generation texts.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|return|>")

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


class Tokenizer:
    """`backend` does the splitting, BPE and decoding. `add_bos_token`/`add_eos_token`, when not None,
    decide whether `encode(..., add_special_tokens=True)` wraps the ids in BOS/EOS (None keeps what the
    backend's post-processor does). `extra_eos_tokens` are further tokens that end generation."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, extra_eos_tokens: Iterable[str] = ()):
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        backend.no_truncation()  # an HF tokenizer.json may carry a training-time max length or padding
        backend.no_padding()
        self._backend = backend
        extra_eos_tokens = tuple(extra_eos_tokens)
        named = [("bos_token", bos_token), ("eos_token", eos_token)]
        for name, tok in named + [(f"extra_eos_tokens[{k}]", t) for k, t in enumerate(extra_eos_tokens)]:
            if tok is not None and (not isinstance(tok, str) or backend.token_to_id(tok) is None):
                raise ValueError(f"{name}={tok!r} is not a token of the vocabulary")
        self._bos, self._eos, self._extra_eos = bos_token, eos_token, extra_eos_tokens
        self._chat_template = chat_template or None
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token and bos_token), bool(add_eos_token and eos_token))
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        eot = [backend.token_to_id(t) for t in self._extra_eos]
        eot += [i for i in map(backend.token_to_id, _END_OF_TURN) if i in self._special_ids]
        eos = backend.token_to_id(eos_token) if eos_token is not None else None
        self._eos_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + sorted(set(eot))))
        self._template = None  # compiled lazily: most engines never render a chat

    def _set_post_processor(self, bos: bool, eos: bool) -> None:
        single = " ".join([f"{self._bos}:0"] * bos + ["$A:0"] + [f"{self._eos}:0"] * eos)
        pair = " ".join([single] + [f"{self._bos}:1"] * bos + ["$B:1"] + [f"{self._eos}:1"] * eos)
        special = [(t, self._backend.token_to_id(t)) for t, on in ((self._bos, bos), (self._eos, eos)) if on]
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                     special_tokens=list(dict(special).items()))

    # ---- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads the tokenizer.* metadata of a GGUF file (not its tensors)."""
        import gguf

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, IndexError or struct errors on bad bytes
            raise ValueError(f"{path!r} is not a readable GGUF file: {e}") from e
        fields = {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.")}
        return cls.from_gguf_fields(fields)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        """`fields`: GGUF metadata keys -> plain Python values (as `gguf.ReaderField.contents()` gives)."""
        kind = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError(f"tokenizer.ggml.tokens must be a non-empty list of strings, got {type(tokens).__name__}")
        types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        vocab = _vocab(tokens)
        if kind == "gpt2":
            backend, add_bos_default = _byte_level_backend(fields, vocab)
        elif kind == "llama":
            backend, add_bos_default = _sentencepiece_backend(fields, tokens, types, vocab), True
        else:
            raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2', 'llama'")
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
                raise ValueError(f"{key}={i!r} is not a token id in [0, {len(tokens)})")
            return tokens[i]

        extra = [t for t in (token("tokenizer.ggml.eot_token_id"), token("tokenizer.ggml.eom_token_id")) if t]
        return cls(backend, bos_token=token("tokenizer.ggml.bos_token_id"),
                   eos_token=token("tokenizer.ggml.eos_token_id"),
                   chat_template=fields.get("tokenizer.chat_template"),
                   add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   extra_eos_tokens=extra)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """An HF tokenizer directory: tokenizer.json, and optionally tokenizer_config.json and chat_template.jinja."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{str(file)!r} does not exist (a tokenizer directory needs tokenizer.json)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type on bad JSON or an unknown component
            raise ValueError(f"{str(file)!r} is not a valid tokenizer.json: {e}") from e
        config = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{str(config_file)!r} is not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"{str(config_file)!r} must hold a JSON object, got {type(config).__name__}")
        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named templates: [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{str(config_file)!r}: chat_template must be a string, got {type(template).__name__}")

        def flag(key):
            v = config.get(key)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{str(config_file)!r}: {key} must be true or false, got {v!r}")
            return v

        return cls(backend, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), chat_template=template,
                   add_bos_token=flag("add_bos_token"), add_eos_token=flag("add_eos_token"),
                   extra_eos_tokens=_token_list(config.get("extra_eos_tokens"), config_file))

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (HF layout) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / "tokenizer.json"))
        bos, eos = self._special_wrapping()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # transformers' generic tokenizer.json reader
            "bos_token": self._bos, "eos_token": self._eos,
            "add_bos_token": bos, "add_eos_token": eos,
            "clean_up_tokenization_spaces": False,
            "chat_template": self._chat_template,
            "extra_eos_tokens": list(self._extra_eos),
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")

    def _special_wrapping(self) -> tuple[bool, bool]:
        """Whether encoding with special tokens puts BOS first / EOS last, probed on the backend itself."""
        plain = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a", add_special_tokens=True).ids
        bos, eos = self.bos_token_id, self.token_to_id(self._eos) if self._eos is not None else None
        n = len(full) - len(plain)
        head = next((k for k in range(n + 1) if full[k:k + len(plain)] == plain), 0)
        return bos is not None and bos in full[:head], eos is not None and eos in full[head + len(plain):]

    # ---- tokens -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids at or past the vocabulary size (a model's padded rows) decode to nothing."""
        ids = [int(i) for i in ids]
        for k, i in enumerate(ids):
            if i < 0:
                raise ValueError(f"ids[{k}]={i} is negative")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self._bos is None else self._backend.token_to_id(self._bos)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The checkpoint's EOS first, then end-of-turn tokens of the vocabulary."""
        return self._eos_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The ids that `decode(..., skip_special_tokens=True)` drops."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> Backend:
        return self._backend

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary's spelling (byte-level vocabularies spell a space 'Ġ'); None if out of range."""
        return self._backend.id_to_token(int(i)) if i >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---- chat -------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders `messages` ([{'role': str, 'content': str}, ...]) with the checkpoint's jinja template,
        in the sandboxed environment and with the variables that transformers' apply_chat_template gives."""
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat_template (the checkpoint carries none)")
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
            for key in ("role", "content"):
                if key not in m:
                    raise ValueError(f"messages[{i}] has no {key!r}")
                if not isinstance(m[key], str):
                    raise ValueError(f"messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__}")
        if self._template is None:
            self._template = _compile_chat_template(self._chat_template)
        specials = {k: v for k, v in (("bos_token", self._bos), ("eos_token", self._eos)) if v is not None}
        return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **specials)


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise ValueError(f"tokenizer.ggml.tokens[{i}] must be a str, got {type(t).__name__}")
        if t in vocab:
            raise ValueError(f"tokenizer.ggml.tokens[{i}]={t!r} repeats tokenizer.ggml.tokens[{vocab[t]}]")
        vocab[t] = i
    return vocab


def _byte_level_backend(fields: dict, vocab: dict[str, int]) -> tuple[Backend, bool]:
    """GPT-2 style BPE over UTF-8 bytes spelled as printable characters; returns (backend, add_bos default)."""
    pre_name = fields.get("tokenizer.ggml.pre") or "default"
    if pre_name not in _PRE:
        raise ValueError(f"tokenizer.ggml.pre={pre_name!r} is not supported; supported: {sorted(_PRE)}")
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
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
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
        raise ValueError(f"tokenizer.ggml.merges[{i}]={merge!r} is not two tokens separated by a space")
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


def _token_list(value, file: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{str(file)!r}: extra_eos_tokens must be a list of strings, got {value!r}")
    return tuple(value)


def _token_text(tok) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _compile_chat_template(source: str):
    """The environment transformers renders chat templates in: sandboxed (templates are untrusted code),
    trim_blocks/lstrip_blocks, loop controls, a non-escaping `tojson`, `raise_exception`, `strftime_now`,
    and `{% generation %}` blocks rendered as plain content."""
    import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid jinja template (line {e.lineno}): {e.message}") from e
