"""v1 ``RecurrentReasoningBlock``: a gated residual MLP applied thinking_steps times with shared weights."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .mlp import MLP


class RecurrentReasoningBlock(nn.Module):
    """Repeat ``thinking_steps`` times: n = norm(x); x = x + σ(gate(n)) ⊙ think_mlp(n).

    Dense layers only, so no op backs it; ``backend`` is accepted so every layer is built alike.
    Works on any leading shape (``[B, N, d]`` in training, ``[B, d]`` while generating).
    """

    def __init__(self, d_model: int, thinking_steps: int = 3, dropout: float = 0.1, *,
                 backend: Optional[str] = None):
        super().__init__()
        self.thinking_steps = thinking_steps
        self.think_mlp = MLP(d_model, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.gate = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.thinking_steps):
            n = self.norm(x)
            x = x + torch.sigmoid(self.gate(n)) * self.think_mlp(n)
        return x
