"""Dropout that keeps a 1-byte mask for backward.

On the CPU, ``F.dropout`` keeps a float mask of the input's size; this keeps a bool one (4x less
for fp32: 90 MB less for the default model at L = 16384 bytes, where v1 applies it 16 times).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, dy):
        (keep,) = ctx.saved_tensors
        return dy * keep * ctx.scale, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments and behaviour) with a bool mask kept for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and not self.inplace and torch.is_grad_enabled() and x.requires_grad:
            return _Dropout.apply(x, self.p)
        return super().forward(x)
