"""AGIFORMER v1, as the original code computes it: the speed/memory baseline and the oracle for
checkpoint compatibility (docs/ops.md §2).

Deliberately naive where v1 was: linear attention materialises k⊗v as [B, L, H, E, E] and
cumsums it (O(L·E²) memory), window attention builds the full L×L score matrix and masks it,
the byte decoder is ``nn.GRU`` followed by a full logits tensor, and generation recomputes the
whole (up to 1024-byte) context for every patch, padding the prompt with spaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearAttention(nn.Module):
    def __init__(self, d_model, num_heads=8, dropout=0.1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, L, D = x.shape
        H, E = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = (F.elu(q.view(B, L, H, E)) + 1.0 + 1e-4) / math.sqrt(E)
        k = F.elu(k.view(B, L, H, E)) + 1.0 + 1e-4
        v = v.view(B, L, H, E)
        kv = torch.einsum("blhe,blhf->blhef", k, v).cumsum(dim=1)
        num = torch.einsum("blhe,blhef->blhf", q, kv)
        den = torch.einsum("blhe,blhe->blh", q, k.cumsum(dim=1)).unsqueeze(-1) + 1e-4
        o = (num / den).reshape(B, L, D)
        return self.dropout(self.norm(self.out_proj(o)))


class SlidingWindowAttention(nn.Module):
    def __init__(self, d_model, num_heads, window_size):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, E]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        i = torch.arange(L, device=x.device).unsqueeze(1)
        j = torch.arange(L, device=x.device).unsqueeze(0)
        mask = (j > i) | (j <= i - self.window_size)
        scores = scores.masked_fill(mask, -1e4)
        o = torch.softmax(scores, dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class HybridBlock(nn.Module):
    def __init__(self, d_model, num_heads, window_size, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SlidingWindowAttention(d_model, num_heads, window_size)
        self.ssm = LinearAttention(d_model, num_heads, dropout)
        self.out_proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.norm_mlp = nn.LayerNorm(d_model)

    def forward(self, x):
        u = self.norm1(x)
        x = x + self.out_proj(self.attn(u) + self.ssm(u))
        return x + self.mlp(self.norm_mlp(x))


class RecurrentReasoningBlock(nn.Module):
    def __init__(self, d_model, thinking_steps=3, dropout=0.1):
        super().__init__()
        self.thinking_steps = thinking_steps
        self.think_mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.norm = nn.LayerNorm(d_model)
        self.gate = nn.Linear(d_model, d_model)

    def forward(self, x):
        for _ in range(self.thinking_steps):
            n = self.norm(x)
            x = x + torch.sigmoid(self.gate(n)) * self.think_mlp(n)
        return x


class ByteLatentEncoder(nn.Module):
    def __init__(self, d_model, patch_size=4, dropout=0.1):
        super().__init__()
        self.patch_size = patch_size
        self.byte_embedding = nn.Embedding(256, d_model)
        self.patch_conv = nn.Conv1d(d_model, d_model, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d_model, 2).float() / d_model)))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        e = self.byte_embedding(x).transpose(1, 2)
        p = self.patch_conv(e).transpose(1, 2)  # [B, N, D]
        t = torch.arange(p.shape[1], device=p.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        half = p.shape[-1] // 2
        rot = torch.cat([-p[..., half:], p[..., :half]], dim=-1)
        p = p * angles.cos() + rot * angles.sin()
        return self.dropout(self.norm(p))


class LocalAutoregressiveHead(nn.Module):
    def __init__(self, d_model, patch_size, hidden_dim=256):
        super().__init__()
        self.patch_size = patch_size
        self.proj_latent = nn.Linear(d_model, hidden_dim)
        self.byte_emb = nn.Embedding(256, hidden_dim)
        self.rnn = nn.GRU(2 * hidden_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, 256)

    def forward(self, latent, target_bytes=None, temperature=0.0):
        B, N, _ = latent.shape
        P = self.patch_size
        c = self.proj_latent(latent).reshape(B * N, 1, -1)
        if target_bytes is not None:
            y = target_bytes.reshape(B * N, P)
            prev = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)
            inp = torch.cat([self.byte_emb(prev), c.expand(-1, P, -1)], dim=-1)
            out, _ = self.rnn(inp)
            return self.head(out).reshape(B, N, P, 256)
        byte = torch.zeros(B * N, 1, dtype=torch.long, device=latent.device)
        h = None
        produced = []
        for _ in range(P):
            out, h = self.rnn(torch.cat([self.byte_emb(byte), c], dim=-1), h)
            logits = self.head(out[:, -1])
            if temperature > 0:
                byte = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
            else:
                byte = logits.argmax(dim=-1, keepdim=True)
            produced.append(byte)
        return torch.cat(produced, dim=1).reshape(B, N, P)


class AGIFORMER(nn.Module):
    def __init__(self, d_model=512, n_layers=6, num_heads=8, patch_size=4, window_size=128, vocab_size=256,
                 dropout=0.1, thinking_steps=3):
        super().__init__()
        self.patch_size = patch_size
        self.encoder = ByteLatentEncoder(d_model, patch_size, dropout)
        self.layers = nn.ModuleList(
            [HybridBlock(d_model, num_heads, window_size, dropout) for _ in range(n_layers)]
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.reasoning = RecurrentReasoningBlock(d_model, thinking_steps, dropout)
        self.head = LocalAutoregressiveHead(d_model, patch_size)

    def forward(self, x, target_bytes=None, temperature=0.0):
        z = self.encoder(x)
        for layer in self.layers:
            z = layer(z)
        z = self.reasoning(self.norm_f(z))
        return self.head(z, target_bytes, temperature)


def train_step(model, optimizer, seq):
    """One v1 training step on a batch of byte windows [B, L]: patch i predicts the P bytes after it."""
    P = model.patch_size
    optimizer.zero_grad(set_to_none=True)
    logits = model(seq[:, :-P], seq[:, P:])
    loss = F.cross_entropy(logits.reshape(-1, 256), seq[:, P:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    return loss


@torch.no_grad()
def generate(model, prompts: list[bytes], max_new_bytes: int, temperature=0.0, max_context=1024) -> list[bytes]:
    """v1's generation loop over a batch of equally long prompts: pad them with spaces to whole patches,
    then for every patch rerun the model over the last ``max_context`` bytes and append the last
    patch's prediction."""
    P = model.patch_size
    rows = [list(p) + [ord(" ")] * (-len(p) % P) for p in prompts]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("v1's loop takes prompts of one length")
    start = len(rows[0])
    device = next(model.parameters()).device
    seq = torch.tensor(rows, dtype=torch.long, device=device)
    while seq.shape[1] - start < max_new_bytes:
        seq = torch.cat([seq, model(seq[:, -max_context:], temperature=temperature)[:, -1]], dim=1)
    return [bytes(r[start : start + max_new_bytes]) for r in seq.tolist()]
