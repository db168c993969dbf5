"""Functional model definitions: pure functions over parameter pytrees."""
