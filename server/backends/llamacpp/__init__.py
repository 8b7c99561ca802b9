"""The llama.cpp backend: llama.cpp's llama-server as our supervised child, behind the token-level seam.

launch.py (where the binary is, its command line), supervisor.py (the child), wire.py (/completion's JSON, the
ids it holds back inside a character), stream.py (one sequence), backend.py (the Backend), factory.py
(settings -> backend).
"""

from server.backends.llamacpp.factory import build_llamacpp_backend

__all__ = ["build_llamacpp_backend"]
