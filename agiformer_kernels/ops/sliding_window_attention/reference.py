"""Pure-PyTorch sliding-window attention: the naive oracle and the efficient fallback.

Query i attends the keys j with i - window < j <= i (and j in i's cu_seqlens segment):
exactly ``window`` keys including itself, fewer at the start of a sequence.

- ``naive_*``: straight from the math, one query (or one sequence) at a time. The oracle.
- ``sliding_window_attention_reference``: blocked. Queries are cut into blocks of ``BLOCK``;
  block b attends the unfolded key span [b·BLOCK - window + 1, b·BLOCK + BLOCK), BLOCK + window - 1
  keys, all blocks in one batched matmul. Work and memory O(L·(window + BLOCK)), no Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import backends
from ._common import OP, STEP_OP, acc_dtype, segment_bounds

BLOCK = 64


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


def naive_sliding_window_attention(q, k, v, window, *, scale=None, cu_seqlens=None):
    """[B, L, H, D] x2, [B, L, H, Dv] -> [B, L, H, Dv]: a loop over queries, each a softmax over its keys."""
    B, L, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    starts = [0] * L
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens]
        for s, e in zip(bounds[:-1], bounds[1:]):
            starts[s:e] = [s] * (e - s)
    rows = []
    for i in range(L):
        lo = max(i - window + 1, starts[i])
        scores = torch.einsum("bhd,bjhd->bhj", qf[:, i], kf[:, lo : i + 1]) * scale
        rows.append(torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), vf[:, lo : i + 1]))
    return torch.stack(rows, dim=1).to(q.dtype)


def naive_sliding_window_attention_step(q, k, v, k_cache, v_cache, pos, *, scale=None):
    """One token per sequence; writes k, v into slot pos % W of the caches, then attends the valid slots."""
    B, W, H, D = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    positions = [int(pos)] * B if not isinstance(pos, torch.Tensor) else [int(p) for p in pos]
    acc = acc_dtype(q.dtype)
    out = []
    for b, p in enumerate(positions):
        k_cache[b, p % W] = k[b]
        v_cache[b, p % W] = v[b]
        n = min(p + 1, W)  # slots 0..n-1 hold the last n tokens (in ring order; softmax ignores order)
        scores = torch.einsum("hd,jhd->hj", q[b].to(acc), k_cache[b, :n].to(acc)) * scale
        out.append(torch.einsum("hj,jhd->hd", scores.softmax(-1), v_cache[b, :n].to(acc)))
    return torch.stack(out).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# The efficient fallback
# ---------------------------------------------------------------------------------------------


def sliding_window_attention_reference(q, k, v, window, *, scale=None, cu_seqlens=None):
    """Blocked form: BLOCK queries against their BLOCK + window - 1 keys, every block in one matmul."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    acc = acc_dtype(q.dtype)
    W = min(window, L)  # a window past the sequence start is plain causal
    C = min(BLOCK, L)
    n_blocks = -(-L // C)
    Lp = n_blocks * C
    S = C + W - 1
    # [B, H, L, D] in the accumulation dtype; keys padded by W-1 in front and up to Lp behind.
    qh = (q.to(acc) * scale).transpose(1, 2)
    qh = F.pad(qh, (0, 0, 0, Lp - L)).reshape(B, H, n_blocks, C, D)
    kh = F.pad(k.to(acc).transpose(1, 2), (0, 0, W - 1, Lp - L))
    vh = F.pad(v.to(acc).transpose(1, 2), (0, 0, W - 1, Lp - L))
    k_span = kh.unfold(2, S, C)  # [B, H, n_blocks, D, S]: key s of block b is position b·C - W + 1 + s
    v_span = vh.unfold(2, S, C)  # [B, H, n_blocks, Dv, S]
    scores = torch.matmul(qh, k_span)  # [B, H, n_blocks, C, S]

    q_pos = torch.arange(Lp, device=q.device).view(n_blocks, C, 1)
    k_pos = q_pos[:, :1] - (W - 1) + torch.arange(S, device=q.device).view(1, 1, S)
    seg_start, _ = segment_bounds(cu_seqlens, L, q.device)
    q_start = F.pad(seg_start.long(), (0, Lp - L)).view(n_blocks, C, 1)  # padded queries: start 0
    # Padded queries (>= L) still see their own zero key, so no row is all -inf (a NaN row would
    # leak into the gradients of every key in its span).
    visible = (k_pos <= q_pos) & (k_pos > q_pos - W) & (k_pos >= q_start)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(-1)
    out = torch.matmul(probs, v_span.transpose(-1, -2))  # [B, H, n_blocks, C, Dv]
    out = out.reshape(B, H, Lp, Dv)[:, :, :L].transpose(1, 2)
    return out.to(q.dtype)


def sliding_window_attention_step_reference(q, k, v, k_cache, v_cache, pos, *, scale=None):
    """Batched step: scatter k, v into the ring slots, one masked softmax over the W slots."""
    B, W, H, D = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    acc = acc_dtype(q.dtype)
    if not isinstance(pos, torch.Tensor):
        pos = torch.full((B,), pos, dtype=torch.int64, device=q.device)
    pos = pos.to(device=q.device, dtype=torch.int64)
    rows = torch.arange(B, device=q.device)
    slot = pos % W
    k_cache[rows, slot] = k.to(k_cache.dtype)
    v_cache[rows, slot] = v.to(v_cache.dtype)
    scores = torch.einsum("bhd,bjhd->bhj", q.to(acc), k_cache.to(acc)) * scale
    valid = torch.arange(W, device=q.device).view(1, W) <= pos.view(B, 1)  # slot j filled once pos >= j
    scores = scores.masked_fill(~valid.view(B, 1, W), float("-inf"))
    return torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v_cache.to(acc)).to(q.dtype)


backends.register(OP, "reference", sliding_window_attention_reference)
backends.register(STEP_OP, "reference", sliding_window_attention_step_reference)
