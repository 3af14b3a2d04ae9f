"""v1 ``ByteLatentEncoder``: bytes → patch vectors (strided conv), rotary position, LayerNorm."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dropout import Dropout

Positions = Union[int, torch.Tensor]


class ByteLatentEncoder(nn.Module):
    """Embeds bytes, merges each ``patch_size`` bytes into one vector by a strided Conv1d (trailing
    ``L mod patch_size`` bytes dropped), rotates patch t by RoPE angle t·inv_freq, then LayerNorm
    and dropout. ``inv_freq`` is a persistent buffer, as in v1's state_dict.

    Pure dense layers (no op backs it); ``backend`` is accepted so every layer is built alike. For
    generation, ``step`` encodes one complete patch at an absolute position, so a stream of patches
    costs O(1) each; the caller keeps the bytes of a patch still incomplete.
    """

    def __init__(self, d_model: int, patch_size: int = 4, dropout: float = 0.1, *, backend: Optional[str] = None):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even for rotary positions, got {d_model}")
        self.patch_size = patch_size
        self.byte_embedding = nn.Embedding(256, d_model)
        self.patch_conv = nn.Conv1d(d_model, d_model, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d_model, 2).float() / d_model)))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def rope(self, p: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``p [..., d]`` by the angles of integer ``positions`` (shape ``p.shape[:-1]``, broadcastable)."""
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        half = p.shape[-1] // 2
        rotated = torch.cat([-p[..., half:], p[..., :half]], dim=-1)
        return (p * angles.cos() + rotated * angles.sin()).to(p.dtype)

    def encode(self, x: torch.Tensor, start: Positions = 0) -> torch.Tensor:
        """Bytes ``[B, L]`` whose first patch sits at patch position ``start`` (int, or int64 ``[B]``)
        -> ``[B, L // patch_size, d_model]``."""
        B, L = x.shape
        P, N = self.patch_size, x.shape[1] // self.patch_size
        # A kernel = stride convolution is one matrix product over each patch's P·d embedded bytes.
        # The weight [d_out, d_in, P] and the embeddings [B, N, P, d_in] disagree on the order of
        # (P, d_in): reorder whichever is smaller (the weight in training, where conv1d would copy and
        # keep the transposed embeddings; the embeddings of the one patch a generation step encodes).
        e = self.byte_embedding(x[:, : N * P]).view(B, N, P, -1)
        w = self.patch_conv.weight
        if B * N <= w.shape[0]:
            p = F.linear(e.transpose(-1, -2).flatten(-2), w.flatten(1), self.patch_conv.bias)
        else:
            p = F.linear(e.flatten(-2), w.permute(0, 2, 1).flatten(1), self.patch_conv.bias)
        positions = torch.arange(N, device=p.device)
        if isinstance(start, torch.Tensor):
            positions = start.unsqueeze(-1) + positions
        else:
            positions = positions + start
        return self.dropout(self.norm(self.rope(p, positions)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bytes ``[B, L]`` -> patch vectors ``[B, L // patch_size, d_model]`` at positions 0..N−1."""
        return self.encode(x, 0)

    def step(self, patch: torch.Tensor, pos: Positions) -> torch.Tensor:
        """One complete patch ``[B, patch_size]`` at patch position ``pos`` -> ``[B, d_model]``."""
        return self.encode(patch, pos)[:, 0]
