"""AGIFORMER v1 (docs/ops.md §2) on the fused layers of ``agiformer_kernels.nn``."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from agiformer_kernels.nn import ByteLatentEncoder, HybridBlock, LocalAutoregressiveHead, RecurrentReasoningBlock
from agiformer_kernels.nn.hybrid_block import State as LayerState

# The constructor arguments, with v1's defaults: a checkpoint's "config" holds exactly these.
DEFAULT_CONFIG = dict(d_model=512, n_layers=6, num_heads=8, patch_size=4, window_size=128, vocab_size=256,
                      dropout=0.1, thinking_steps=3)


class AGIFORMER(nn.Module):
    """Byte-level hybrid language model: bytes → patches (``encoder``) → ``n_layers`` hybrid window /
    linear-attention blocks → ``norm_f`` → ``reasoning`` → a GRU ``head`` that decodes the P bytes of
    the next patch from each patch's latent.

    Same constructor, forward and state_dict keys as the original v1 model (an original checkpoint
    loads with ``strict=True``); ``backend`` goes to every op call (None: fastest available).
    """

    def __init__(self, d_model: int = 512, n_layers: int = 6, num_heads: int = 8, patch_size: int = 4,
                 window_size: int = 128, vocab_size: int = 256, dropout: float = 0.1, thinking_steps: int = 3,
                 *, backend: Optional[str] = None):
        super().__init__()
        if vocab_size != 256:
            raise ValueError(f"AGIFORMER models bytes: vocab_size must be 256, got {vocab_size}")
        self.config = dict(d_model=d_model, n_layers=n_layers, num_heads=num_heads, patch_size=patch_size,
                           window_size=window_size, vocab_size=vocab_size, dropout=dropout,
                           thinking_steps=thinking_steps)
        self.patch_size = patch_size
        self.encoder = ByteLatentEncoder(d_model, patch_size, dropout, backend=backend)
        self.layers = nn.ModuleList(
            [HybridBlock(d_model, num_heads, window_size, dropout, backend=backend) for _ in range(n_layers)]
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.reasoning = RecurrentReasoningBlock(d_model, thinking_steps, dropout, backend=backend)
        self.head = LocalAutoregressiveHead(d_model, patch_size, backend=backend)

    def _top(self, z: torch.Tensor) -> torch.Tensor:
        return self.reasoning(self.norm_f(z))

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Bytes ``[B, L]`` -> one latent per complete patch ``[B, L // P, d_model]``; latent i predicts
        the bytes of patch i + 1."""
        z = self.encoder(x)
        for layer in self.layers:
            z = layer(z)
        return self._top(z)

    def forward(self, x: torch.Tensor, target_bytes: Optional[torch.Tensor] = None, temperature: float = 0.0,
                *, top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Bytes ``[B, L]``. With ``target_bytes`` ``[B, N·P]`` (N = L // P): logits ``[B, N, P, 256]``;
        without: the sampled bytes of every next patch ``[B, N, P]``."""
        return self.head(self.latents(x), target_bytes, temperature, top_k=top_k, generator=generator)

    def loss(self, x: torch.Tensor, target_bytes: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy in nats (fp32) of ``target_bytes`` given ``x``, by the fused head (no logits)."""
        return self.head.loss(self.latents(x), target_bytes, reduction)

    def sequence_loss(self, seq: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """v1's training alignment on byte windows ``[B, L]``: x = seq[:, :L−P] predicts seq[:, P:]."""
        P = self.patch_size
        n = (seq.shape[1] - P) // P * P
        return self.loss(seq[:, :n], seq[:, P : P + n], reduction)

    # Streaming: prefill a prompt's complete patches, then one patch per step in O(1) of the context.

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, list[LayerState]]:
        """Bytes ``[B, N·P]`` at patch positions 0..N−1 -> (the last patch's latent ``[B, d_model]``,
        per-layer state for ``step`` at position N)."""
        z = self.encoder(x)
        states = []
        for layer in self.layers:
            z, state = layer.prefill(z)
            states.append(state)
        return self._top(z[:, -1]), states

    def step(self, patch: torch.Tensor, states: list[LayerState], pos: Union[int, torch.Tensor]) -> torch.Tensor:
        """One complete patch ``[B, P]`` at patch position ``pos`` (int or int64 ``[B]``) -> its latent
        ``[B, d_model]``; ``states`` advance in place."""
        z = self.encoder.step(patch, pos)
        for layer, state in zip(self.layers, states):
            z = layer.step(z, state, pos)
        return self._top(z)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
