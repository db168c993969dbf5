"""Structured output: what a request asks its text to match (`StructuredOutputs`), compiled to a token
grammar whose per-step mask of allowed tokens the engine hands to the device (`jinfer.grammar.matcher`).
Host only (no jax): the edge compiles and checks a request's grammar, the scheduler advances its matcher."""

from jinfer.grammar.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
