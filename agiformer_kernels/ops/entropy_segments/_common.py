"""What every entropy-segmentation backend shares: names, the rules, the boundary scan over entropies.

The C++ op ``entropy_segments_fwd(logits, seq_start, rule, threshold, delta, max_len)`` returns
``(entropy, starts)``: entropy ``[B, L]`` in the accumulation dtype, starts ``[B, L]`` bool. ``seq_start``
is int32 ``[L]``, the first position of each position's ``cu_seqlens`` sequence (zeros without one);
``rule`` is ``RULES[name]``; ``threshold`` is +inf where the delta rule has none; ``max_len`` is 0 for none.
The Triton backend computes the entropies in its kernel and the boundaries with ``boundaries`` below.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OP = "entropy_segments"
OFFSETS_OP = "segment_offsets"
LIBRARY = "entropy_segments"  # csrc/entropy_segments/
RULES = {"delta": 0, "global": 1}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype, which is also the entropies' dtype, for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_start(cu_seqlens: Optional[torch.Tensor], L: int, device: torch.device) -> torch.Tensor:
    """Per position, the first position of its sequence, int32 [L] (zeros without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(L, dtype=torch.int32, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], torch.arange(L, device=device), right=True)
    return cu[seq].to(torch.int32)


def kernel_options(rule: str, threshold: Optional[float], delta: Optional[float], max_len: Optional[int]):
    """The kernels' (rule, threshold, delta, max_len) for the public function's validated options."""
    return (RULES[rule], float("inf") if threshold is None else float(threshold), 0.0 if delta is None else float(delta),
            0 if max_len is None else int(max_len))


def boundaries(entropy: torch.Tensor, seq_start: torch.Tensor, rule: int, threshold: float, delta: float,
               max_len: int) -> torch.Tensor:
    """starts [B, L] from entropy [B, L] by the kernels' options: O(B·L) batched ops.

    max_len: counting from each rule-made start, every max_len-th position is a forced start, so the
    forced starts of a run are exactly the positions whose distance to the last rule-made start is a
    positive multiple of max_len."""
    B, L = entropy.shape
    pos = torch.arange(L, device=entropy.device)
    rel = (pos - seq_start.to(pos.dtype)).view(1, L)  # position within its sequence
    prev = F.pad(entropy[:, :-1], (1, 0))  # H_{t-1} (garbage at a sequence's first position, masked below)
    if rule == RULES["delta"]:
        starts = (entropy > prev + delta) | (entropy > threshold) | (rel == 0)
    else:
        starts = (prev > threshold) | (rel <= 1)
    if max_len > 0:
        last = torch.where(starts, pos.view(1, L), 0).cummax(1).values
        dist = pos.view(1, L) - last
        starts = starts | (dist % max_len == 0)
    return starts


def fwd_fake(logits, seq_start, rule, threshold, delta, max_len):
    B, L, _ = logits.shape
    return logits.new_empty(B, L, dtype=acc_dtype(logits.dtype)), logits.new_empty(B, L, dtype=torch.bool)
