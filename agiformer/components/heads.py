"""Heads: a patch latent -> the bytes of the next patch, picked by ``head_cls``.

A head has ``forward(latent, target_bytes=None, temperature=0.0, *, top_k=None, generator=None)`` (logits
``[B, N, P, 256]`` with targets, sampled bytes without), ``loss(latent, target_bytes, reduction)``,
``sample(latent, *, temperature, top_k, prefix, generator)`` and the ``cached_byte_table()`` context
(a no-op where nothing is cached), as ``agiformer_kernels.nn.LocalAutoregressiveHead`` has.
"""

from __future__ import annotations

from ..cards import Carded
from agiformer_kernels.nn import LocalAutoregressiveHead

from .registry import Context, Registry, require_int

HEADS = Registry("head", "head_cls")


@HEADS.register("gru_patch")
class GRUPatchHead(Carded, LocalAutoregressiveHead):
    """v1's byte decoder: proj_latent → a GRU (width ``hidden_dim``, v1 256) over the patch's bytes →
    256 logits per byte, on the fused ``gru_patch_*`` ops."""

    def __init__(self, ctx: Context, *, hidden_dim: int = 256):
        super().__init__(ctx.d_model, ctx.patch_size, require_int("hidden_dim", hidden_dim, 1), backend=ctx.backend)
