"""Structured outputs: a JSON schema (response_format, text.format, a forced tool call) -> one grammar for every
engine (grammar.py, formats.py), and the native engine's matchers and token masks (matcher.py, vocab.py)."""
