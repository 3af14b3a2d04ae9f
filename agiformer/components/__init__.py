"""Composable AGIFORMER architectures: registries of components, picked by name in a model config.

    from agiformer import AGIFORMER
    from agiformer.components import MIXERS
    model = AGIFORMER.from_config({"n_layers": 2, "architecture": [
        {"block_cls": "hybrid"},                                                   # v1's layer
        {"block_cls": "sequential", "mixer": {"mixer_cls": "causal_attention"},
         "mlp": {"mlp_cls": "glu", "act_fn": "silu"}, "norm": {"norm_cls": "rms"}}]})

One registry per kind, each a read-only mapping of name -> class with ``.register(name)``:

- ``EMBEDDINGS`` (``embedding_cls``): ``byte_patch``
- ``MIXERS`` (``mixer_cls``): ``window_attention``, ``linear_attention``, ``causal_attention``
- ``BLOCKS`` (``block_cls``): ``hybrid``, ``sequential``, ``parallel``
- ``MLPS`` (``mlp_cls``): ``mlp``, ``glu``
- ``NORMS`` (``norm_cls``): ``layer``, ``rms``
- ``TOPS`` (``top_cls``): ``reasoning``, ``none``
- ``HEADS`` (``head_cls``): ``gru_patch``

The config (``config.validate``) and the contracts a new component keeps are in each module's docstring;
named configs ("flavors") in ``flavors``.
"""

from . import flavors
from .blocks import BLOCKS
from .config import MODEL_KEYS, validate
from .embeddings import EMBEDDINGS
from .heads import HEADS
from .mixers import MIXERS
from .mlps import MLPS
from .norms import NORMS
from .registry import Context, Registry, UnknownComponentError, build
from .tops import TOPS

__all__ = ["BLOCKS", "EMBEDDINGS", "HEADS", "MIXERS", "MLPS", "NORMS", "TOPS", "Context", "MODEL_KEYS", "Registry",
           "UnknownComponentError", "build", "flavors", "validate"]
