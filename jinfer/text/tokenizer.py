"""Text <-> token ids. The Hugging Face `tokenizers` library does the BPE work.

A `Tokenizer` wraps one `tokenizers.Tokenizer` (the backend) plus what a checkpoint says around it: the
BOS/EOS tokens, whether encoding adds them, and the chat template (`jinfer.text.chat_template`). It is read
from an HF tokenizer directory (`from_dir`) and written back as one (`save`) that both `from_dir` and
`transformers.AutoTokenizer` read; importers build it from other formats (a GGUF file's vocabulary:
`jinfer.checkpoints.gguf_vocab`). Ids leave as plain `list[int]`; text leaves as `str`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import processors

from jinfer.text.chat_template import ChatTemplate

# Tokens that end an assistant turn in common chat formats: a chat model stops on them even where the
# checkpoint names another EOS (SmolLM2: eos <|im_end|>; Llama 3 instruct: eos <|end_of_text|>, turns end
# with <|eot_id|>). llama.cpp keeps a similar list of end-of-generation texts.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|return|>")


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
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token and bos_token), bool(add_eos_token and eos_token))
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        eot = [backend.token_to_id(t) for t in self._extra_eos]
        eot += [i for i in map(backend.token_to_id, _END_OF_TURN) if i in self._special_ids]
        eos = backend.token_to_id(eos_token) if eos_token is not None else None
        self._eos_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + sorted(set(eot))))
        self._chat = ChatTemplate(chat_template, bos_token=bos_token, eos_token=eos_token) if chat_template else None

    def _set_post_processor(self, bos: bool, eos: bool) -> None:
        single = " ".join([f"{self._bos}:0"] * bos + ["$A:0"] + [f"{self._eos}:0"] * eos)
        pair = " ".join([single] + [f"{self._bos}:1"] * bos + ["$B:1"] + [f"{self._eos}:1"] * eos)
        special = [(t, self._backend.token_to_id(t)) for t, on in ((self._bos, bos), (self._eos, eos)) if on]
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                     special_tokens=list(dict(special).items()))

    # ---- construction -----------------------------------------------------------------------------------

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
            "chat_template": self.chat_template,
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
        # The batch call releases the GIL while the Rust side works (encode() holds it), so a server's
        # other threads run on during a multi-megabyte text.
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids at or past the vocabulary size (a model's padded rows) decode to nothing."""
        ids = [int(i) for i in ids]
        for k, i in enumerate(ids):
            if i < 0:
                raise ValueError(f"ids[{k}]={i} is negative")
        return self._backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]  # GIL released too

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
        return None if self._chat is None else self._chat.source

    @property
    def backend(self) -> Backend:
        return self._backend

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary's spelling (byte-level vocabularies spell a space 'Ġ'); None if out of range."""
        return self._backend.id_to_token(int(i)) if i >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---- chat -------------------------------------------------------------------------------------------

    def with_chat_template(self, template: str) -> "Tokenizer":
        """This tokenizer with `template` (Jinja, as in tokenizer_config.json) as its chat template."""
        if not isinstance(template, str) or not template.strip():
            raise ValueError("chat_template must be a non-empty Jinja template")
        other = copy.copy(self)
        other._chat = ChatTemplate(template, bos_token=self._bos, eos_token=self._eos)
        return other

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders `messages` ([{'role': str, 'content': str}, ...]) with the checkpoint's jinja template,
        in the sandboxed environment and with the variables that transformers' apply_chat_template gives."""
        if self._chat is None:
            raise ValueError("this tokenizer has no chat_template (the checkpoint carries none)")
        return self._chat.render(messages, add_generation_prompt=add_generation_prompt)


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
