"""Load generators for any OpenAI-compatible server: `python -m bench.serve`, `python -m bench.embeddings`."""
