"""fac: reproduce and extend Fun-Audio-Chat (DRSR speech LLM) at tiny and paper scale.

Subpackages: `fac.data` (the tiny world's data), `fac.model` (the DRSR model), `fac.cli` (what rules call).
"""
__version__ = "0.1.0"
