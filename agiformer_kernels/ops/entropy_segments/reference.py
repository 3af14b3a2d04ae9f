"""Pure-PyTorch entropy segmentation: the naive oracle and the efficient fallback.

- ``naive_*``: straight from the words of docs/ops.md §1.4, one position at a time. The oracle.
- ``entropy_segments_reference``: entropies ``ROWS`` positions at a time (one [ROWS, V] log-softmax tile, never
  the whole [B, L, V] softmax), boundaries by ``_common.boundaries`` in batched ops.
"""

from __future__ import annotations

import torch

from ... import backends
from ._common import OFFSETS_OP, OP, acc_dtype, boundaries, kernel_options, sequence_start

ROWS = 8192  # positions per log-softmax tile: few enough tiles that per-op overhead stays small


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, L, V] -> [B, L]: H = -sum_v p_v log p_v of softmax(logits), one position at a time (p = 0 adds 0)."""
    B, L, V = logits.shape
    out = torch.empty(B, L, dtype=acc_dtype(logits.dtype))
    for b in range(B):
        for t in range(L):
            x = logits[b, t].to(acc_dtype(logits.dtype))
            logp = x - torch.logsumexp(x, 0)
            p = logp.exp()
            out[b, t] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum()
    return out


def naive_starts(entropy: torch.Tensor, *, rule: str, threshold=None, delta=None, max_len=None,
                 cu_seqlens=None) -> torch.Tensor:
    """[B, L] entropies -> [B, L] bool starts, a loop over positions written from the rules' words."""
    B, L = entropy.shape
    bounds = [0, L] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    starts = torch.zeros(B, L, dtype=torch.bool)
    H = entropy.tolist()
    for b in range(B):
        for s, e in zip(bounds[:-1], bounds[1:]):
            run = 0  # positions since the last start
            for t in range(s, e):
                i = t - s  # position within the sequence
                if rule == "delta":
                    # position 0 starts; t >= 1 starts when H_t > H_{t-1} + delta, or H_t > threshold when given
                    cut = i == 0 or H[b][t] > H[b][t - 1] + delta or (threshold is not None and H[b][t] > threshold)
                else:
                    # bytes 0 and 1 start; byte j starts when the entropy of its own prediction (made at j-1)
                    # exceeds threshold
                    cut = i <= 1 or H[b][t - 1] > threshold
                if not cut and max_len is not None and run == max_len:
                    cut = True  # the segment has max_len positions: force a cut
                starts[b, t] = cut
                run = 1 if cut else run + 1
    return starts


def naive_segment_offsets(starts: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> int32 [S + 1]: every row's first position starts a segment; offsets over the flat batch."""
    B, L = starts.shape
    offsets = []
    for b in range(B):
        for t in range(L):
            if t == 0 or bool(starts[b, t]):
                offsets.append(b * L + t)
    return torch.tensor(offsets + [B * L], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# The efficient fallback
# ---------------------------------------------------------------------------------------------


def entropy_reference(logits: torch.Tensor) -> torch.Tensor:
    """[B, L, V] -> [B, L] in the accumulation dtype, ROWS positions per log-softmax tile."""
    B, L, V = logits.shape
    acc = acc_dtype(logits.dtype)
    flat = logits.reshape(B * L, V)
    out = torch.empty(B * L, dtype=acc, device=logits.device)
    for r in range(0, B * L, ROWS):
        logp = torch.log_softmax(flat[r : r + ROWS].to(acc), dim=-1)
        plogp = logp.exp() * logp
        out[r : r + ROWS] = -torch.where(logp == float("-inf"), torch.zeros_like(plogp), plogp).sum(-1)
    return out.view(B, L)


def entropy_segments_reference(logits, *, rule, threshold, delta=None, max_len=None, cu_seqlens=None):
    entropy = entropy_reference(logits)
    seq_start = sequence_start(cu_seqlens, logits.shape[1], logits.device)
    return entropy, boundaries(entropy, seq_start, *kernel_options(rule, threshold, delta, max_len))


def segment_offsets_reference(starts: torch.Tensor) -> torch.Tensor:
    B, L = starts.shape
    flat = starts.clone()
    flat[:, :1] = True  # segments never cross rows
    idx = flat.reshape(-1).nonzero().squeeze(1)
    return torch.cat([idx, idx.new_full((1,), B * L)]).to(torch.int32)


backends.register(OP, "reference", entropy_segments_reference)
backends.register(OFFSETS_OP, "reference", segment_offsets_reference)
