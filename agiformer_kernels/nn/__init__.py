"""Drop-in AGIFORMER layers on the fused ops.

Each takes v1's constructor arguments and has v1's parameter names (a v1 state_dict loads with
``strict=True``), plus ``backend=`` passed to every op call. The sequence layers also stream:
``prefill`` runs a prompt and returns the state that continues it, ``step`` advances one patch in
O(1) of the context length.
"""

from .encoder import ByteLatentEncoder
from .head import LocalAutoregressiveHead
from .hybrid_block import HybridBlock
from .linear_attention import LinearAttention
from .reasoning import RecurrentReasoningBlock
from .sliding_window_attention import SlidingWindowAttention

__all__ = [
    "ByteLatentEncoder",
    "HybridBlock",
    "LinearAttention",
    "LocalAutoregressiveHead",
    "RecurrentReasoningBlock",
    "SlidingWindowAttention",
]
