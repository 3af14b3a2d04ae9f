"""AGIFORMER (v1: docs/ops.md §2) built from the components of ``agiformer.components`` on the fused ops."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
import torch.nn as nn

from .cards import Carded
from .components import BLOCKS, EMBEDDINGS, HEADS, NORMS, TOPS, Context, build, validate
from .components.config import SIZES, layers

# v1's sizes, the constructor's defaults; a full config (``model.config``) adds the architecture and parts.
DEFAULT_CONFIG = dict(SIZES)
LayerState = tuple  # one state per mixer of the block (v1: (window ring buffers, linear-attention (S, z)))


class AGIFORMER(Carded, nn.Module):
    """Byte-level language model: bytes → patches (``encoder``) → ``n_layers`` blocks → ``norm_f`` → a top
    stage (v1: ``reasoning``) → a ``head`` that decodes the P bytes of the next patch from each patch's latent.

    ``AGIFORMER(d_model=…, …)`` is v1's constructor: with no ``architecture`` it builds v1, whose forward
    and state_dict keys are the original's (an original checkpoint loads with ``strict=True``).
    ``architecture`` (one layer dict, or a list of ``n_layers``), ``embedding``, ``final_norm``, ``top`` and
    ``head`` pick other components by name (``agiformer.components``); ``AGIFORMER.from_config`` takes all of
    it as one dict and ``model.config`` gives it back, every omitted choice filled in. ``backend`` goes to
    every op call (None: fastest available).
    """

    def __init__(self, d_model: int = 512, n_layers: int = 6, num_heads: int = 8, patch_size: int = 4,
                 window_size: int = 128, vocab_size: int = 256, dropout: float = 0.1, thinking_steps: int = 3,
                 *, architecture: Union[dict, list, None] = None, embedding: Optional[dict] = None,
                 final_norm: Optional[dict] = None, top: Optional[dict] = None, head: Optional[dict] = None,
                 backend: Optional[str] = None):
        super().__init__()
        self.config = validate(dict(d_model=d_model, n_layers=n_layers, num_heads=num_heads, patch_size=patch_size,
                                    window_size=window_size, vocab_size=vocab_size, dropout=dropout,
                                    thinking_steps=thinking_steps, architecture=architecture, embedding=embedding,
                                    final_norm=final_norm, top=top, head=head))
        cfg = self.config
        ctx = Context(d_model=d_model, num_heads=num_heads, window_size=window_size, patch_size=patch_size,
                      dropout=dropout, thinking_steps=thinking_steps, backend=backend)
        self.patch_size = patch_size
        # Built in v1's order (encoder, layers, norm_f, reasoning, head): a seed gives v1's initial weights.
        self.encoder = build(EMBEDDINGS, cfg["embedding"], ctx, "embedding")
        self.layers = nn.ModuleList([build(BLOCKS, spec, replace(ctx, layer=i, path=path), path)
                                     for i, (path, spec) in enumerate(layers(cfg))])
        self.norm_f = build(NORMS, cfg["final_norm"], ctx, "final_norm")
        top_stage = build(TOPS, cfg["top"], ctx, "top")
        self.top_slot = getattr(top_stage, "slot", "top")
        self.add_module(self.top_slot, top_stage)
        self.head = build(HEADS, cfg["head"], ctx, "head")

    @classmethod
    def from_config(cls, config: dict, *, backend: Optional[str] = None) -> "AGIFORMER":
        """The model ``config`` describes (``model.config`` of another model, a flavor, a dict of one's own);
        ``ValueError`` for unknown component names, bad values or a wrong number of layers, ``TypeError`` for
        unknown keys, each naming the place."""
        return cls(**validate(config), backend=backend)

    @property
    def top_stage(self) -> nn.Module:
        """The top stage (v1: ``reasoning``), stored under its class's ``slot``."""
        return getattr(self, self.top_slot)

    def _top(self, z: torch.Tensor) -> torch.Tensor:
        return self.top_stage(self.norm_f(z))

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

    # Streaming: prefill a prompt's complete patches, then one patch per step: O(1) of the context for every
    # mixer but causal_attention, whose step attends (and whose KV cache holds) the whole context.

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
