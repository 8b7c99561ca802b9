"""The vLLM backend: a vLLM server in --tokens-only mode behind our token-level seam (server/backends/base.py).

wire.py (vLLM's JSON), prefix.py (forced prefixes), stream.py (one sequence), backend.py (the Backend),
supervisor.py (launch mode) / remote.py (connect mode), launch.py (its command line), probe.py (what a vLLM is),
adapters.py (LoRA for vLLM), factory.py (settings -> backend).
"""

from server.backends.vllm.backend import VLLMBackend
from server.backends.vllm.factory import build_vllm_backend

__all__ = ["VLLMBackend", "build_vllm_backend"]
