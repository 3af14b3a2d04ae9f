"""Embeddings: bytes -> one vector per patch, picked by ``embedding_cls``.

An embedding takes bytes ``[B, L]`` to ``[B, L // patch_size, d_model]`` (``forward``, positions from 0) and
has ``step(patch [B, patch_size], pos) -> [B, d_model]`` for one complete patch at patch position ``pos``.
"""

from __future__ import annotations

from ..cards import Carded
from agiformer_kernels.nn import ByteLatentEncoder

from .registry import Context, Registry

EMBEDDINGS = Registry("embedding", "embedding_cls")


@EMBEDDINGS.register("byte_patch")
class BytePatchEmbedding(Carded, ByteLatentEncoder):
    """v1's encoder: Embedding → Conv1d over each patch (kernel = stride = patch_size) → RoPE → LayerNorm →
    dropout."""

    def __init__(self, ctx: Context):
        super().__init__(ctx.d_model, ctx.patch_size, ctx.dropout, backend=ctx.backend)
