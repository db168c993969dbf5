"""The sampling flags of `jinfer generate`, `jinfer chat` and `jinfer client`, with SamplingParams' own
defaults (one set of defaults for the CLI, the servers and the Python API; --help shows them)."""

from __future__ import annotations

import argparse
import dataclasses

from jinfer.inputs import SamplingParams

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens_help: str | None = None) -> None:
    """`max_tokens_help`: where the command's default max_tokens differs from SamplingParams' (chat: the rest
    of the context, as the HTTP chat endpoint), what it is; the flag's default is then None."""
    g = p.add_argument_group("sampling (SamplingParams' defaults)")
    if max_tokens_help is None:
        g.add_argument("--max-tokens", type=int, default=_DEFAULTS["max_tokens"], help="tokens to generate at most")
    else:
        g.add_argument("--max-tokens", type=int, default=None, help=max_tokens_help)
    g.add_argument("--temperature", type=float, default=_DEFAULTS["temperature"], help="0 is greedy")
    g.add_argument("--top-k", type=int, default=_DEFAULTS["top_k"], help="0: no cut")
    g.add_argument("--top-p", type=float, default=_DEFAULTS["top_p"], help="nucleus: 1 keeps every token")
    g.add_argument("--min-p", type=float, default=_DEFAULTS["min_p"],
                   help="drop tokens less likely than this times the most likely one")
    g.add_argument("--repetition-penalty", type=float, default=_DEFAULTS["repetition_penalty"], help="1: off")
    g.add_argument("--seed", type=int, default=None, help="none: a fresh seed per request")
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")


def sampling_fields(args, max_tokens: int | None = None) -> dict:
    """The flags as SamplingParams keywords (`max_tokens` where the flag was left at None)."""
    return dict(max_tokens=args.max_tokens if args.max_tokens is not None else max_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop or ()))
