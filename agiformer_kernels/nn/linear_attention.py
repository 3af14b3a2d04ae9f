"""AGIFORMER's linear-attention branch (v1 ``LinearAttention``) on ``agiformer_kernels.linear_attention``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import linear_attention, linear_attention_step
from .dropout import Dropout

State = tuple[torch.Tensor, torch.Tensor]  # (S [B, H, E, E], z [B, H, E]), fp32 (fp64 for fp64 inputs)

# v1's constants: φ(x) = elu(x) + 1 + 1e-4, o = q̂ᵀS / (q̂ᵀz + 1e-4), q̂ scaled by 1/√E.
FEATURE_EPS = 1e-4
EPS = 1e-4


class LinearAttention(nn.Module):
    """Causal linear attention, out_proj, LayerNorm, dropout; state_dict as v1's.

    ``qkv`` produces ``[q | k | v]`` per token, each viewed ``[H, E]`` with E = d_model / num_heads.
    """

    def __init__(self, d_model: int, num_heads: int = 8, dropout: float = 0.1, *, backend: Optional[str] = None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.out_proj(o.flatten(-2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, d_model]`` -> ``[B, L, d_model]``."""
        q, k, v = self._split(x)
        o = linear_attention(q, k, v, feature_eps=FEATURE_EPS, eps=EPS, backend=self.backend)
        return self._output(o)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward`` over a sequence starting at position 0, plus the state that continues it."""
        q, k, v = self._split(x)
        o, state = linear_attention(
            q, k, v, feature_eps=FEATURE_EPS, eps=EPS, output_final_state=True, backend=self.backend
        )
        return self._output(o), state

    def step(self, x: torch.Tensor, state: State) -> torch.Tensor:
        """One position: x ``[B, d_model]`` -> ``[B, d_model]``; ``state`` advances in place."""
        q, k, v = self._split(x)
        o = linear_attention_step(q, k, v, state, feature_eps=FEATURE_EPS, eps=EPS, backend=self.backend)
        return self._output(o)
