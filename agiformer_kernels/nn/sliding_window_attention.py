"""AGIFORMER's local branch (v1 ``SlidingWindowAttention``) on ``agiformer_kernels.sliding_window_attention``."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .. import sliding_window_attention, sliding_window_attention_step

State = tuple[torch.Tensor, torch.Tensor]  # ring buffers (k_cache, v_cache) [B, window, H, E]


class SlidingWindowAttention(nn.Module):
    """Each position attends itself and the window − 1 before it; state_dict as v1's (no dropout).

    ``qkv`` output is laid out ``[3, H, E]`` per token.
    """

    def __init__(self, d_model: int, num_heads: int, window_size: int, *, backend: Optional[str] = None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.window_size = window_size
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, d_model]`` -> ``[B, L, d_model]``."""
        q, k, v = self._split(x)
        o = sliding_window_attention(q, k, v, self.window_size, backend=self.backend)
        return self.proj(o.flatten(-2))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward`` over positions 0..L−1, plus ring buffers holding the last window keys/values
        (position j in slot j % window, as ``sliding_window_attention_step`` expects)."""
        q, k, v = self._split(x)
        o = sliding_window_attention(q, k, v, self.window_size, backend=self.backend)
        B, L, H, E = k.shape
        W = self.window_size
        k_cache = k.new_zeros(B, W, H, E)
        v_cache = v.new_zeros(B, W, H, E)
        last = torch.arange(max(0, L - W), L, device=x.device)
        k_cache[:, last % W] = k[:, last]
        v_cache[:, last % W] = v[:, last]
        return self.proj(o.flatten(-2)), (k_cache, v_cache)

    def step(self, x: torch.Tensor, state: State, pos: Union[int, torch.Tensor]) -> torch.Tensor:
        """Position ``pos`` (int, or int64 ``[B]`` per row): x ``[B, d_model]`` -> ``[B, d_model]``;
        the ring buffers in ``state`` are written in place."""
        q, k, v = self._split(x)
        o = sliding_window_attention_step(q, k, v, state[0], state[1], pos, backend=self.backend)
        return self.proj(o.flatten(-2))
