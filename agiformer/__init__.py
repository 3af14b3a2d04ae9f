"""AGIFORMER: a byte-level hybrid language model on the fused ops of ``agiformer_kernels``.

``AGIFORMER()`` is v1; ``AGIFORMER.from_config(cfg)`` builds other architectures from the registries of
``agiformer.components`` (embeddings, mixers, blocks, MLPs, norms, top stages, heads).

Train with ``python -m agiformer.train``, score with ``python -m agiformer.evaluate``, sample with
``python -m agiformer.generate`` (API: ``agiformer.generation.generate``), look inside with
``python -m agiformer.inspect``.
"""

__all__ = ["AGIFORMER"]


def __getattr__(name: str):
    # Imported lazily so the command-line modules can set OpenMP's environment before torch loads.
    if name == "AGIFORMER":
        from .model import AGIFORMER

        return AGIFORMER
    raise AttributeError(f"module 'agiformer' has no attribute {name!r}")
