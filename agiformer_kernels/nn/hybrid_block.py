"""v1 ``HybridBlock``: window attention and linear attention side by side, then an MLP."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from . import linear_attention, sliding_window_attention
from .linear_attention import LinearAttention
from .mlp import MLP
from .sliding_window_attention import SlidingWindowAttention

State = tuple[sliding_window_attention.State, linear_attention.State]


class HybridBlock(nn.Module):
    """u = norm1(x); x = x + out_proj(attn(u) + ssm(u)); x = x + mlp(norm_mlp(x))."""

    def __init__(self, d_model: int, num_heads: int, window_size: int, dropout: float, *,
                 backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SlidingWindowAttention(d_model, num_heads, window_size, backend=backend)
        self.ssm = LinearAttention(d_model, num_heads, dropout, backend=backend)
        self.out_proj = nn.Linear(d_model, d_model)
        self.mlp = MLP(d_model, dropout)
        self.norm_mlp = nn.LayerNorm(d_model)

    def _finish(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = x + self.out_proj(a + s)
        return x + self.mlp(self.norm_mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, d_model]`` -> ``[B, L, d_model]``."""
        u = self.norm1(x)
        return self._finish(x, self.attn(u), self.ssm(u))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward`` over positions 0..L−1, plus the (window, linear-attention) state that continues it."""
        u = self.norm1(x)
        a, attn_state = self.attn.prefill(u)
        s, ssm_state = self.ssm.prefill(u)
        return self._finish(x, a, s), (attn_state, ssm_state)

    def step(self, x: torch.Tensor, state: State, pos: Union[int, torch.Tensor]) -> torch.Tensor:
        """Position ``pos``: x ``[B, d_model]`` -> ``[B, d_model]``; ``state`` advances in place."""
        u = self.norm1(x)
        return self._finish(x, self.attn.step(u, state[0], pos), self.ssm.step(u, state[1]))
