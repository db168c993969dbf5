"""Random JSON schemas and a fixed set of regexes for the structured-output tests.

Every schema bounds its instances' length (strings have maxLength, arrays maxItems, integers a range), so that
even a random-weight model, which never chooses to stop, completes an instance within a few dozen tokens."""

from __future__ import annotations

import numpy as np

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "red", "green", "blue"]

REGEXES = [
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"[a-z]{3,8}@[a-z]{3,6}\.(com|org|net)",
    r"\+1 [0-9]{3}-[0-9]{3}-[0-9]{4}",
    r"#[0-9a-f]{6}",
    r"([0-9]{1,3}\.){3}[0-9]{1,3}",
    r"(cat|dog|bird)s?",
    r"[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6}){0,2}",
    r"(yes|no|maybe)",
    r"[0-9]+(\.[0-9]{1,2})? (USD|EUR)",
    r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}",
    r"[a-z_]{1,10}\([a-z, ]{0,12}\)",
    r"(true|false)",
    r"-?[1-9][0-9]{0,5}",
    r"[A-Z]{2}[0-9]{2} [A-Z0-9]{4}",
    r"(https?)://[a-z]{2,10}\.[a-z]{2,3}(/[a-z]{1,6}){0,2}",
    r"[0-2][0-9]:[0-5][0-9]",
    r"<[a-z]{1,6}>[a-z ]{0,12}</[a-z]{1,6}>",
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)day?",
    r"[a-f0-9]{8}-[a-f0-9]{4}",
    r"\[[0-9]{1,2}(, [0-9]{1,2}){0,3}\]",
]


def random_schema(rng: np.random.Generator, depth: int = 0) -> dict:
    """An object schema of 1-4 properties of random (bounded) types, some nested."""
    props = {}
    for i in range(int(rng.integers(1, 5))):
        props[f"{WORDS[int(rng.integers(len(WORDS)))]}_{i}"] = _value(rng, depth + 1)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _value(rng: np.random.Generator, depth: int) -> dict:
    kinds = ["string", "integer", "boolean", "enum", "const", "null", "anyOf", "pattern"]
    if depth < 3:
        kinds += ["array", "object"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "string":
        lo = int(rng.integers(0, 3))
        return {"type": "string", "minLength": lo, "maxLength": lo + int(rng.integers(1, 10))}
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-z]{2,5}[0-9]?$"}
    if kind == "integer":
        lo = int(rng.integers(-1000, 1000))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 5000))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": list(rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False))
                + ([int(rng.integers(100))] if rng.random() < 0.5 else [])}
    if kind == "const":
        return {"const": WORDS[int(rng.integers(len(WORDS)))]}
    if kind == "anyOf":
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 4}]}
    if kind == "array":
        lo = int(rng.integers(0, 2))
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": lo,
                "maxItems": lo + int(rng.integers(1, 3))}
    return random_schema(rng, depth)
