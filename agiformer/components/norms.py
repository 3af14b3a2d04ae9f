"""Norms: the blocks' pre-norms and the model's final norm, picked by ``norm_cls``."""

from __future__ import annotations

from ..cards import Carded
import torch.nn as nn

from .registry import Context, Registry

NORMS = Registry("norm", "norm_cls")


def _eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps = {eps!r}: must be a positive number")
    return float(eps)


@NORMS.register("layer")
class LayerNorm(Carded, nn.LayerNorm):
    """v1's ``nn.LayerNorm(d_model)`` (weight and bias)."""

    def __init__(self, ctx: Context, *, eps: float = 1e-5):
        super().__init__(ctx.d_model, eps=_eps(eps))


@NORMS.register("rms")
class RMSNorm(Carded, nn.RMSNorm):
    """``nn.RMSNorm(d_model)``: x / rms(x) · weight, no mean subtraction and no bias."""

    def __init__(self, ctx: Context, *, eps: float = 1e-6):
        super().__init__(ctx.d_model, eps=_eps(eps))
