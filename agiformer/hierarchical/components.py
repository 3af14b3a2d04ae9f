"""The parts of the hierarchical autoencoder: token embeddings, local transformer stacks, the segment compressor,
the vector quantiser, the code expander and the top code LM.

Tokens are bytes at the bottom level and code indices above it. Every stack is causal; none uses positions
beyond what its mixers infer, so each input vector sums the embeddings of its token and the ``ngram − 1``
tokens before it (an explicit local order signal for the attention, which has no position encoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from agiformer_kernels import entropy_segments, segment_offsets, segment_pool, vq_ema_update, vq_nearest

from ..components import BLOCKS, Context, build
from ..components.mlps import GeluMLP


def shift_right(ids: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """``ids [B, L]`` moved n positions later, the first n filled with ``fill``."""
    if n == 0:
        return ids
    return F.pad(ids, (n, 0), value=fill)[:, : ids.shape[1]]


class TokenEmbedding(nn.Module):
    """Token t -> Σ_j E_j[ids_{t−j}] for j < ngram; before the start, the BOS id ``vocab``."""

    def __init__(self, vocab: int, d_model: int, ngram: int):
        super().__init__()
        self.vocab = vocab
        self.tables = nn.ModuleList(nn.Embedding(vocab + 1, d_model) for _ in range(ngram))
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02 if len(self.tables) == 1 else 0.02 / math.sqrt(len(self.tables)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, L]`` int -> ``[B, L, d_model]``."""
        out = self.tables[0](ids)
        for j, table in enumerate(self.tables[1:], 1):
            out = out + table(shift_right(ids, j, self.vocab))
        return out


def local_stack(d_model: int, num_heads: int, n_layers: int, mixer: dict, backend: Optional[str],
                path: str) -> nn.ModuleList:
    """``n_layers`` pre-norm sequential blocks (``mixer``, a GELU MLP of width 4d, LayerNorm), built from the
    components registry so every mixer runs on the fused ops."""
    ctx = Context(d_model=d_model, num_heads=num_heads, window_size=mixer.get("window_size", 1), patch_size=1,
                  dropout=0.0, thinking_steps=0, backend=backend, path=path)
    spec = {"block_cls": "sequential", "mixer": mixer, "mlp": {"mlp_cls": "mlp"}, "norm": {"norm_cls": "layer"}}
    return nn.ModuleList(build(BLOCKS, spec, replace(ctx, layer=i, path=f"{path}[{i}]"), f"{path}[{i}]")
                         for i in range(n_layers))


def run_stack(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (nats, fp32) ``[B, L]``, 0 where ``mask`` is False."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    return ce * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class Segments:
    """A batch's segmentation: ``starts [B, L]`` (padding starts its own segments), ``seg_id [B, L]`` (each
    position's segment, counted from 0 in its row), the packed ``offsets [S + 1]`` of every segment (padding
    ones included) for ``segment_pool``, and per row the ``count [B]`` of segments that start before the row's
    length, their ``start`` and ``end`` (last position) ``[B, S_max]`` (``L`` past the count), and where the
    packed valid segments go in ``[B, S_max]`` (``rows``, ``cols``, selected from packed by ``valid``)."""

    starts: torch.Tensor
    seg_id: torch.Tensor
    offsets: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor

    @property
    def max_count(self) -> int:
        return self.start.shape[1]


def segment_layout(starts: torch.Tensor, lengths: torch.Tensor) -> Segments:
    """The ``Segments`` of start flags ``[B, L]`` for rows of ``lengths [B]`` (>= 1): position 0 and position
    ``lengths[b]`` (the first padding position) always start a segment, so no segment mixes data and padding."""
    B, L = starts.shape
    pos = torch.arange(L, device=starts.device)
    starts = starts.clone()
    starts[:, 0] = True
    starts |= pos == lengths[:, None]
    seg_id = starts.long().cumsum(1) - 1
    offsets = segment_offsets(starts)
    first = offsets[:-1].long()
    row = first // L
    col_start = first % L
    col_end = (offsets[1:].long() - 1) % L
    per_row = starts.sum(1)
    row_first = per_row.cumsum(0) - per_row
    index_in_row = torch.arange(first.shape[0], device=starts.device) - row_first[row]
    valid = col_start < lengths[row]
    count = (starts & (pos < lengths[:, None])).sum(1)
    S = int(count.max())
    rows, cols = row[valid], index_in_row[valid]
    start = torch.full((B, S), L, dtype=torch.long, device=starts.device)
    end = torch.full((B, S), L, dtype=torch.long, device=starts.device)
    start[rows, cols] = col_start[valid]
    end[rows, cols] = col_end[valid]
    return Segments(starts, seg_id, offsets, valid, rows, cols, count, start, end)


def scatter_segments(values: torch.Tensor, seg: Segments, fill: float = 0) -> torch.Tensor:
    """Valid packed per-segment ``values [N, ...]`` -> ``[B, S_max, ...]`` (``fill`` past each row's count)."""
    out = values.new_full((seg.count.shape[0], seg.max_count, *values.shape[1:]), fill)
    out[seg.rows, seg.cols] = values
    return out


class SegmentCompressor(nn.Module):
    """Tokens -> one pooled vector per segment.

    A local causal transformer (window attention) reads the tokens; its ``lm_head`` predicts the next token
    (the entropy LM). ``entropy_segments`` cuts where that prediction is uncertain (docs/ops.md §1.4), and
    ``segment_pool`` pools each segment's positions with ``num_queries`` learned queries (§1.5), projected to
    ``code_dim`` and layer-normalised (no affine) for the quantiser. The cut threshold is the buffer
    ``threshold``; with ``target_len`` it follows, in training, an EMA of the entropy quantile that gives
    segments of that mean length (updated after the batch is cut, so a batch's segmentation reads only earlier
    batches).
    """

    def __init__(self, vocab: int, level: dict, ngram: int, *, backend: Optional[str] = None, path: str = ""):
        super().__init__()
        d, h = level["d_model"], level["num_heads"]
        self.segmenter = dict(level["segmenter"])
        self.backend = backend
        self.num_heads, self.head_dim = h, d // h
        self.embed = TokenEmbedding(vocab, d, ngram)
        self.layers = local_stack(d, h, level["compressor_layers"],
                                  {"mixer_cls": "window_attention", "window_size": level["window_size"]},
                                  backend, f"{path}.compressor")
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)
        self.kv = nn.Linear(d, 2 * d)
        self.queries = nn.Parameter(torch.randn(level["num_queries"], h, self.head_dim) * self.head_dim ** -0.5)
        self.to_code = nn.Linear(level["num_queries"] * d, level["code_dim"])
        # A fixed scale for the vectors the quantiser sees, so codebook and encoder cannot drift apart in scale.
        self.code_norm = nn.LayerNorm(level["code_dim"], elementwise_affine=False)
        threshold = self.segmenter["threshold"]
        self.register_buffer("threshold", torch.tensor(float("nan") if threshold is None else threshold))

    def hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids [B, L]`` -> (hidden ``[B, L, d]``, next-token logits ``[B, L, vocab]``); position t reads
        tokens <= t."""
        h = self.norm(run_stack(self.layers, self.embed(ids)))
        return h, self.lm_head(h)

    def cut(self, logits: torch.Tensor, lengths: torch.Tensor, *, adapt: bool = False) -> Segments:
        """The segmentation of ``logits [B, L, vocab]`` under the current threshold; ``adapt`` then moves the
        threshold toward ``target_len`` (when configured)."""
        s = self.segmenter
        threshold = None if s["threshold"] is None else float(self.threshold)
        entropy, starts = entropy_segments(logits.detach().float(), rule=s["rule"], threshold=threshold,
                                           delta=s["delta"], max_len=s["max_len"], backend=self.backend)
        if adapt and s["target_len"] is not None:
            valid = torch.arange(entropy.shape[1], device=entropy.device) < lengths[:, None]
            quantile = torch.quantile(entropy[valid], 1 - 1 / s["target_len"])
            self.threshold.lerp_(quantile.to(self.threshold.dtype), 1 - s["adapt_decay"])
        return segment_layout(starts, lengths)

    def pool(self, h: torch.Tensor, seg: Segments) -> torch.Tensor:
        """Hidden ``[B, L, d]`` -> the valid segments' vectors ``[N, code_dim]`` (packed row by row)."""
        B, L, d = h.shape
        k, v = self.kv(h).view(B * L, 2, self.num_heads, self.head_dim).unbind(1)
        pooled = segment_pool(self.queries, k, v, seg.offsets, backend=self.backend)  # [S, Q, H, E]
        return self.code_norm(self.to_code(pooled[seg.valid].flatten(1)))


@dataclass
class Quantised:
    """The quantiser's result for ``[N, D]`` vectors: ``quantized`` (straight-through), ``index [N]``, the
    commitment and codebook losses (scalars) and the batch's code ``perplexity`` (a 0-dim tensor)."""

    quantized: torch.Tensor
    index: torch.Tensor
    commitment: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser (``vq_nearest``, docs/ops.md §1.6) with a straight-through estimator.

    - Losses: commitment = mean ‖z − sg(c)‖²; codebook = mean ‖sg(z) − c‖² for a learned codebook, 0 with
      ``ema`` (the codebook is then a buffer that ``vq_ema_update`` moves toward the mean of its vectors).
    - ``counts`` is the EMA of each code's assignments per update (kept in both modes); a code whose count is
      below ``dead_threshold`` is dead.
    - ``update=True`` (training forward): the EMA step, the write of the batch's vectors into the ring buffer
      ``recent`` (the last ``buffer_size`` encoder outputs), and every ``reset_interval`` updates the dead-code
      reset: each dead code becomes a random row of ``recent``. The first update sets the codebook to random
      vectors of that batch. A new or reset code starts at the count ``dead_threshold``, so it stays only if
      used. Random draws use a generator seeded from the buffers ``seed`` and ``updates``, so
      ``state_dict()`` holds everything a resumed run needs.
    """

    def __init__(self, codebook_size: int, code_dim: int, vq: dict, *, backend: Optional[str] = None):
        super().__init__()
        self.K, self.D = codebook_size, code_dim
        self.ema, self.decay = vq["ema"], vq["decay"]
        self.dead_threshold, self.reset_interval = vq["dead_threshold"], vq["reset_interval"]
        self.backend = backend
        codebook = torch.randn(codebook_size, code_dim)
        if self.ema:
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("counts", torch.full((codebook_size,), vq["dead_threshold"]))
        self.register_buffer("sums", codebook * vq["dead_threshold"])
        self.register_buffer("recent", torch.zeros(vq["buffer_size"], code_dim))
        self.register_buffer("recent_seen", torch.zeros((), dtype=torch.long))  # vectors written in all
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("resets", torch.zeros((), dtype=torch.long))  # codes reset in all
        self.register_buffer("seed", torch.randint(0, 2**62, (), dtype=torch.long))

    def dead(self) -> torch.Tensor:
        """``[K]`` bool: codes whose usage EMA is below ``dead_threshold``."""
        return self.counts < self.dead_threshold

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.recent.device).manual_seed(int(self.seed) + int(self.updates))

    def forward(self, z: torch.Tensor, *, update: bool = False) -> Quantised:
        """``z [N, D]`` (valid vectors only) -> ``Quantised``; ``update`` does the bookkeeping above."""
        if update and int(self.updates) == 0 and z.shape[0] > 0:
            self._initialise(z.detach().float())
        index, _ = vq_nearest(z.detach(), self.codebook.detach().to(z.dtype), backend=self.backend)
        c = self.codebook[index].to(z.dtype)
        commitment = F.mse_loss(z, c.detach()) if z.shape[0] else z.sum() * 0
        codebook_loss = (F.mse_loss(c, z.detach()) if z.shape[0] else c.sum() * 0) if not self.ema else z.new_zeros(())
        usage = torch.bincount(index, minlength=self.K).float() / max(1, index.shape[0])
        perplexity = torch.exp(-(usage * torch.log(usage.clamp_min(1e-12))).sum())
        quantized = z + (c - z).detach()
        if update and z.shape[0] > 0:
            self._update(z.detach().float(), index)
        return Quantised(quantized, index, commitment, codebook_loss, perplexity)

    @torch.no_grad()
    def _initialise(self, z: torch.Tensor) -> None:
        pick = torch.randint(0, z.shape[0], (self.K,), generator=self._generator(), device=z.device)
        self._set_codes(torch.arange(self.K, device=z.device), z[pick], self.dead_threshold)

    @torch.no_grad()
    def _set_codes(self, which: torch.Tensor, vectors: torch.Tensor, count: float) -> None:
        self.codebook.data[which] = vectors.to(self.codebook.dtype)
        self.counts[which] = count
        self.sums[which] = vectors * count

    @torch.no_grad()
    def _update(self, z: torch.Tensor, index: torch.Tensor) -> None:
        if self.ema:
            self.codebook.copy_(vq_ema_update(z, index, self.counts, self.sums, decay=self.decay,
                                              backend=self.backend))
        else:
            n = torch.bincount(index, minlength=self.K).to(self.counts.dtype)
            self.counts.mul_(self.decay).add_(n, alpha=1 - self.decay)
        R = self.recent.shape[0]
        rows = z[-R:]
        slots = (int(self.recent_seen) + torch.arange(rows.shape[0], device=z.device)) % R
        self.recent[slots] = rows
        self.recent_seen += z.shape[0]
        self.updates += 1
        if self.reset_interval and int(self.updates) % self.reset_interval == 0:
            dead = self.dead().nonzero().flatten()
            if dead.numel():
                filled = min(int(self.recent_seen), R)
                pick = torch.randint(0, filled, (dead.numel(),), generator=self._generator(), device=z.device)
                self._set_codes(dead, self.recent[pick], self.dead_threshold)
                self.resets += dead.numel()


class CrossAttentionBlock(nn.Module):
    """x = x + out(attention of norm(x) over its own memory slots); x = x + mlp(norm(x)). Each position has its
    own few memory slots ``[B, L, W, d]`` (its most recent visible codes), so the attention is O(L·W)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.norm = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm_mlp = nn.LayerNorm(d_model)
        ctx = Context(d_model=d_model, num_heads=num_heads, window_size=1, patch_size=1, dropout=0.0,
                      thinking_steps=0)
        self.mlp = GeluMLP(ctx)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, d]``, memory ``[B, L, W, d]``, mask ``[B, L, W]`` bool (at least one True per position)."""
        B, L, W, d = memory.shape
        q = self.q(self.norm(x)).view(B, L, self.num_heads, 1, self.head_dim)
        k, v = self.kv(memory).view(B, L, W, 2, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        scores = (q @ k.transpose(-1, -2)).squeeze(-2) * self.head_dim ** -0.5  # [B, L, H, W]
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        o = (scores.softmax(-1).unsqueeze(-2) @ v).view(B, L, d)
        x = x + self.out(o)
        return x + self.mlp(self.norm_mlp(x))


RECON, CAUSAL = 0, 1  # the expander's two ways of reading codes (CodeExpander.logits)


class CodeExpander(nn.Module):
    """Codes -> the tokens of the level below, causal over those tokens.

    A local causal transformer (window attention) reads the targets shifted right by one (BOS first), so the
    logits at t see targets < t. ``cross_layers`` blocks then let position t attend its ``code_window`` most
    recent *visible* codes (each code vector plus a learned recency embedding) and a learned null slot (so a
    position with no visible code is well defined). Which codes are visible is the caller's ``latest [B, L]``:
    the index of the newest code position t may read, the ones before it visible too, −1 for none.

    - ``RECON`` (reconstruction): latest = t's own segment. The codes of the segment being decoded and those
      before it: the autoencoder, and generation once a segment's code has been chosen.
    - ``CAUSAL``: latest = the newest segment known to be complete from targets < t. A true causal LM.

    A learned embedding of (mode, t − start of the newest visible segment, clipped at ``max_offset``; "none")
    is added before the cross layers, so one set of weights serves both modes.
    """

    def __init__(self, vocab: int, level: dict, ngram: int, *, backend: Optional[str] = None, path: str = ""):
        super().__init__()
        d, h = level["d_model"], level["num_heads"]
        self.vocab = vocab
        self.code_window, self.max_offset = level["code_window"], level["max_offset"]
        self.embed = TokenEmbedding(vocab, d, ngram)
        self.layers = local_stack(d, h, level["expander_layers"],
                                  {"mixer_cls": "window_attention", "window_size": level["window_size"]},
                                  backend, f"{path}.expander")
        self.code_proj = nn.Linear(level["code_dim"], d)
        self.recency = nn.Parameter(torch.randn(self.code_window, d) * 0.02)
        self.null = nn.Parameter(torch.randn(d) * 0.02)
        self.offset = nn.Embedding(2 * (self.max_offset + 2), d)
        nn.init.normal_(self.offset.weight, std=0.02)
        self.cross = nn.ModuleList(CrossAttentionBlock(d, h) for _ in range(level["cross_layers"]))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def trunk(self, targets: torch.Tensor) -> torch.Tensor:
        """``targets [B, L]`` -> ``[B, L, d]``; position t reads targets < t."""
        return run_stack(self.layers, self.embed(shift_right(targets, 1, self.vocab)))

    def logits(self, h: torch.Tensor, codes: torch.Tensor, code_start: torch.Tensor, latest: torch.Tensor,
               mode: int) -> torch.Tensor:
        """``h [B, L, d]`` (``trunk``), ``codes [B, S, code_dim]``, their segments' first positions
        ``code_start [B, S]``, ``latest [B, L]`` (−1: none visible), ``mode`` RECON or CAUSAL -> logits
        ``[B, L, vocab]``."""
        B, L, d = h.shape
        W = self.code_window
        if codes.shape[1] == 0:  # nothing to read: one code slot that every position masks out
            codes = codes.new_zeros(B, 1, codes.shape[2])
            code_start = code_start.new_zeros(B, 1)
        S = codes.shape[1]
        slot = latest[:, :, None] - torch.arange(W, device=h.device)  # [B, L, W]: the r-th newest visible code
        mask = slot >= 0
        slot = slot.clamp(0, S - 1)
        memory = self.code_proj(codes)
        memory = torch.gather(memory, 1, slot.view(B, L * W, 1).expand(B, L * W, d)).view(B, L, W, d)
        memory = torch.cat([memory + self.recency, self.null.expand(B, L, 1, d)], 2)
        mask = torch.cat([mask, mask.new_ones(B, L, 1)], 2)
        newest_start = torch.gather(code_start, 1, latest.clamp(0, S - 1))
        since = (torch.arange(L, device=h.device) - newest_start).clamp(0, self.max_offset)
        since = torch.where(latest >= 0, since, self.max_offset + 1)
        x = h + self.offset(since + mode * (self.max_offset + 2))
        for block in self.cross:
            x = block(x, memory, mask)
        return self.head(self.norm(x))


class CodeLM(nn.Module):
    """The top language model: the next top-level code from the codes before it (discrete, cross-entropy), a
    causal stack of ``mixer`` blocks (linear attention: O(1) state per code, any context; or window attention
    over the last ``window_size`` codes)."""

    def __init__(self, vocab: int, top: dict, ngram: int, *, backend: Optional[str] = None):
        super().__init__()
        d = top["d_model"]
        self.vocab = vocab
        mixer = {"mixer_cls": top["mixer"]}
        if top["mixer"] == "window_attention":
            mixer["window_size"] = top["window_size"]
        self.embed = TokenEmbedding(vocab, d, ngram)
        self.layers = local_stack(d, top["num_heads"], top["n_layers"], mixer, backend, "top_lm")
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, S]`` -> logits ``[B, S, vocab]``; position s predicts codes[s] from codes < s."""
        h = run_stack(self.layers, self.embed(shift_right(codes, 1, self.vocab)))
        return self.head(self.norm(h))
