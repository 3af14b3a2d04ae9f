"""A hierarchical byte autoencoder with entropy patching (after Abstractinator), on the fused ops.

    from agiformer.hierarchical import HierarchicalAutoencoder, load_config
    model = HierarchicalAutoencoder(load_config("tiny"))
    out = model(x)                 # x: bytes [B, L]; out.loss, out.losses, out.metrics
    model.nll(x)                   # [B, L] −log p(x_t | x_<t), nats: a true causal likelihood
    model.generate_bytes(b"def ", 64)

Bytes are cut into segments where a small causal byte LM is uncertain, each segment pooled and quantised
into one code; expanders rebuild each level from its codes; a second level compresses the first level's
codes the same way; an optional top LM models the top codes. The parts: ``components``; the config:
``config``; the model, its stages, ``nll`` and generation: ``model``.
"""

from .components import CodeExpander, CodeLM, SegmentCompressor, VectorQuantizer
from .config import load_config, names, validate
from .model import HierarchicalAutoencoder, Output, num_parameters

__all__ = ["CodeExpander", "CodeLM", "HierarchicalAutoencoder", "Output", "SegmentCompressor", "VectorQuantizer",
           "load_config", "names", "num_parameters", "validate"]
