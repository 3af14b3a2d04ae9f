"""MLPs: the position-wise part of a block, picked by ``mlp_cls``."""

from __future__ import annotations

from ..cards import Carded
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from agiformer_kernels.nn.dropout import Dropout
from agiformer_kernels.nn.mlp import MLP

from .registry import Context, Registry, require_int

MLPS = Registry("mlp", "mlp_cls")

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}


@MLPS.register("mlp")
class GeluMLP(Carded, MLP):
    """v1's MLP: Linear(d, n_inner) → exact GELU → Linear(n_inner, d) → dropout (n_inner default 4d), on
    ``gelu_mlp``, which recomputes the GELU in backward instead of keeping its output."""

    def __init__(self, ctx: Context, *, n_inner: Optional[int] = None):
        hidden = 4 * ctx.d_model if n_inner is None else require_int("n_inner", n_inner, 1)
        super().__init__(ctx.d_model, ctx.dropout, hidden)


@MLPS.register("glu")
class GLU(Carded, nn.Module):
    """Gated linear unit: [a | b] = fc1(x), fc2(act_fn(a) ⊙ b), dropout (act_fn "silu": SwiGLU, "gelu": GeGLU).

    ``n_inner`` defaults to 8d/3 rounded up to a multiple of 8, which gives the ``mlp``'s parameter count.
    One matrix product makes both halves.
    """

    def __init__(self, ctx: Context, *, act_fn: str = "silu", n_inner: Optional[int] = None):
        super().__init__()
        if act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn = {act_fn!r}: one of {', '.join(ACTIVATIONS)}")
        d = ctx.d_model
        hidden = -(-8 * d // 3 // 8) * 8 if n_inner is None else require_int("n_inner", n_inner, 1)
        self.act_fn = act_fn
        self.fc1 = nn.Linear(d, 2 * hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.dropout = Dropout(ctx.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.dropout(self.fc2(ACTIVATIONS[self.act_fn](a) * b))
