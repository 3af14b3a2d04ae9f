"""v1's MLP, Linear(d, 4d) → exact GELU → Linear(4d, d) → dropout, keeping less for backward.

Autograd would keep three activations per MLP: the input, the GELU input and the GELU output
([N, 4d] each of the last two). The GELU output is cheap to recompute from its input, so
``gelu_mlp`` keeps only the input and the GELU input: at L = 16384 bytes that is 300 MB less for
the default model's nine MLPs (six blocks, three thinking steps), for no extra matrix product.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dropout import Dropout


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)  # under autocast this runs in the autocast dtype, as backward will
        ctx.save_for_backward(x, h, w1, w2)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, w2 = ctx.saved_tensors
        dtype = h.dtype  # the dtype forward computed in (autocast's, if it was on)
        dy, x, w1, w2 = dy.to(dtype), x.to(dtype), w1.to(dtype), w2.to(dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = F.gelu(h)
        dw2 = dy2.T @ g.reshape(-1, g.shape[-1])
        del g
        dh = torch.ops.aten.gelu_backward(dy @ w2, h)
        dh2 = dh.reshape(-1, dh.shape[-1])
        dw1 = dh2.T @ x.reshape(-1, x.shape[-1])
        return dh @ w1, dw1, dh2.sum(0), dw2, dy2.sum(0)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)``, recomputing the GELU in backward."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2)):
        return _GeluMLP.apply(x, w1, b1, w2, b2)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


class MLP(nn.Sequential):
    """``nn.Sequential(Linear(d, h), GELU(), Linear(h, d), Dropout(p))`` with h = ``hidden`` (v1: 4d; v1's
    state_dict keys ``0.*`` and ``2.*``), computed by ``gelu_mlp``."""

    def __init__(self, d_model: int, dropout: float, hidden: Optional[int] = None):
        hidden = 4 * d_model if hidden is None else hidden
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model), Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _, down, dropout = self
        return dropout(gelu_mlp(x, up.weight, up.bias, down.weight, down.bias))
