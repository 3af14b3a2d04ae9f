"""v1 ``LocalAutoregressiveHead``: a GRU decodes each patch's bytes from its latent, on the gru_patch ops."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .. import gru_patch_byte_table, gru_patch_decode, gru_patch_loss, gru_patch_sample

SOS = 0  # v1 starts every patch from byte 0


class LocalAutoregressiveHead(nn.Module):
    """``proj_latent`` maps a patch latent to the GRU context; each of the patch's ``patch_size`` steps
    reads ``[byte_emb(previous byte) | context]`` (GRU from h0 = 0) and ``head`` gives 256 logits.

    ``rnn`` is an ``nn.GRU`` only to hold v1's parameters (``rnn.weight_ih_l0`` ...); the recurrence
    runs in the fused ops. The GRU runs in the latent's dtype (bf16 under autocast, as nn.GRU would).
    """

    def __init__(self, d_model: int, patch_size: int, hidden_dim: int = 256, *, backend: Optional[str] = None):
        super().__init__()
        self.patch_size = patch_size
        self.backend = backend
        self.proj_latent = nn.Linear(d_model, hidden_dim)
        self.byte_emb = nn.Embedding(256, hidden_dim)
        self.rnn = nn.GRU(2 * hidden_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, 256)
        self._byte_tables: Optional[dict] = None  # see cached_byte_table

    @contextlib.contextmanager
    def cached_byte_table(self) -> Iterator[None]:
        """Within this context ``sample`` builds the GRU's byte table (``gru_patch_byte_table``, a
        256×3h×h product) once per dtype and device and reuses it, instead of once per call: for many
        calls with unchanged weights, as in generation. The weights must not change inside it."""
        outer, self._byte_tables = self._byte_tables, {}
        try:
            yield
        finally:
            self._byte_tables = outer

    def _context(self, latent: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        c = self.proj_latent(latent).flatten(0, -2)
        rnn = self.rnn
        weights = (self.byte_emb.weight, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        return c, tuple(w.to(c.dtype) for w in weights)

    def _targets(self, latent: torch.Tensor, target_bytes: torch.Tensor) -> torch.Tensor:
        M = latent.shape[:-1].numel()
        if target_bytes.numel() != M * self.patch_size:
            raise ValueError(
                f"target_bytes must hold patch_size = {self.patch_size} bytes for each of the {M} latents, "
                f"got shape {tuple(target_bytes.shape)}"
            )
        return target_bytes.reshape(M, self.patch_size)

    def forward(self, latent: torch.Tensor, target_bytes: Optional[torch.Tensor] = None, temperature: float = 0.0,
                *, top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """latent ``[B, N, d_model]``. With ``target_bytes`` ``[B, N·P]``: teacher-forced logits
        ``[B, N, P, 256]``; without: sampled bytes ``[B, N, P]`` (temperature 0 = argmax)."""
        if target_bytes is None:
            return self.sample(latent, temperature=temperature, top_k=top_k, generator=generator)
        y = self._targets(latent, target_bytes)
        prev = torch.cat([torch.full_like(y[:, :1], SOS), y[:, :-1]], dim=1)
        c, weights = self._context(latent)
        hidden = gru_patch_decode(c, prev, *weights, backend=self.backend)
        return self.head(hidden).reshape(*latent.shape[:-1], self.patch_size, 256)

    def loss(self, latent: torch.Tensor, target_bytes: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy (nats, fp32) of ``target_bytes`` ``[B, N·P]`` without materialising logits;
        ``reduction="none"`` gives ``[B·N, P]``."""
        y = self._targets(latent, target_bytes)
        c, weights = self._context(latent)
        head = (self.head.weight.to(c.dtype), self.head.bias.to(c.dtype))
        return gru_patch_loss(c, y, *weights, *head, sos=SOS, reduction=reduction, backend=self.backend)

    @torch.no_grad()
    def sample(self, latent: torch.Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None,
               prefix: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Bytes ``[..., P]`` of the patch each latent ``[..., d_model]`` predicts; ``prefix`` ``[M, r]``
        (r < P) forces the first r bytes of each of the M patches."""
        c, weights = self._context(latent)
        head = (self.head.weight.to(c.dtype), self.head.bias.to(c.dtype))
        table = None
        if self._byte_tables is not None:
            table = self._byte_tables.get((c.dtype, c.device))
            if table is None:
                table = self._byte_tables[c.dtype, c.device] = gru_patch_byte_table(weights[0], weights[1])
        out = gru_patch_sample(c, *weights, *head, patch_size=self.patch_size, temperature=temperature,
                               top_k=top_k, prefix=prefix, sos=SOS, generator=generator, byte_table=table,
                               backend=self.backend)
        return out.reshape(*latent.shape[:-1], self.patch_size)
