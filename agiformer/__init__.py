"""AGIFORMER: a byte-level hybrid language model on the fused ops of ``agiformer_kernels``.

Train with ``python -m agiformer.train``, score with ``python -m agiformer.evaluate``, sample with
``python -m agiformer.generate`` (API: ``agiformer.generation.generate``), look inside with
``python -m agiformer.inspect``.
"""

from .model import AGIFORMER

__all__ = ["AGIFORMER"]
