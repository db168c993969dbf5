"""StructuredOutputs: the one constraint a request's output must match (vLLM's `StructuredOutputsParams`).

Exactly one of the fields is set: a JSON schema, any JSON object, a regular expression, a choice among
strings, or a grammar (Lark, or llama.cpp's GBNF). Only its shape is checked here; whether a schema or
regex compiles is checked at the edge, where the tokenizer is known (`jinfer.grammar.matcher`).
"""

from __future__ import annotations

import dataclasses
import json as _json
from collections.abc import Mapping, Sequence

MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar text: compiling one this size takes seconds already


def mask_words(vocab_size: int) -> int:
    """Words of a token bitmask (i32[ceil(V / 32)]: token t allowed iff bit t % 32 of word t // 32 is set)."""
    return (vocab_size + 31) // 32


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    json: str | None = None  # a JSON schema (a dict is accepted and kept as its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # Lark or GBNF

    def __post_init__(self):
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", _json.dumps(self.json))
        elif self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"json must be a JSON schema (an object or its JSON text), not {type(self.json).__name__}")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes, Mapping)) or not isinstance(self.choice, Sequence):
                raise ValueError("choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise ValueError("choice is empty")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"choice has {len(self.choice)} strings; at most {MAX_CHOICES}")
            for j, c in enumerate(self.choice):
                if not isinstance(c, str) or not c:
                    raise ValueError(f"choice[{j}] must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be true or false, not {type(self.json_object).__name__}")
        for name in ("json", "regex", "grammar"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, str):
                raise ValueError(f"{name} must be a string, not {type(v).__name__}")
            if not v.strip():
                raise ValueError(f"{name} is empty")
            if len(v) > MAX_SPEC_CHARS:
                raise ValueError(f"{name} has {len(v)} characters; at most {MAX_SPEC_CHARS}")
        given = self.given
        if len(given) != 1:
            raise ValueError("exactly one of json, json_object, regex, choice, grammar must be given"
                             + (f", not {len(given)} ({', '.join(given)})" if given else ""))

    @property
    def given(self) -> list[str]:
        """The fields set (json_object counts when true)."""
        return [f.name for f in dataclasses.fields(self)
                if (self.json_object if f.name == "json_object" else getattr(self, f.name) is not None)]

    @property
    def kind(self) -> str:
        return self.given[0]

    @classmethod
    def of(cls, value) -> StructuredOutputs:
        """A StructuredOutputs, or a mapping of its fields (JSON, a proto's set fields)."""
        if isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"must be an object with one of json, json_object, regex, choice, grammar, not "
                             f"{type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{unknown[0]} is not a field; expected one of {sorted(names)}")
        return cls(**value)
