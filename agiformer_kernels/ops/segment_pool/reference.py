"""Pure-PyTorch segment pooling: the naive oracle and the efficient fallback.

Segment s holds positions offsets[s] .. offsets[s+1] - 1 of k and v; each of the Q queries attends them alone.

- ``naive_segment_pool``: a loop over segments, each a softmax over its own keys. The oracle.
- ``segment_pool_reference``: every position's scores against the Q queries at once, ``[T, Q, H]``; the
  per-segment max, sum and weighted value sum by scatter over segment ids. Work and memory O(T·Q·H·(D + Dv)),
  never a dense [S·Q, T] mask. Differentiable through PyTorch's autograd.
"""

from __future__ import annotations

import torch

from ... import backends
from ._common import OP, acc_dtype, segment_ids


def naive_segment_pool(queries, k, v, offsets, *, scale=None):
    """[Q, H, D], [T, H, D], [T, H, Dv], [S + 1] -> [S, Q, H, Dv]: one softmax per segment."""
    D = queries.shape[-1]
    scale = D**-0.5 if scale is None else scale
    acc = acc_dtype(queries.dtype)
    qf, kf, vf = queries.to(acc), k.to(acc), v.to(acc)
    bounds = [int(x) for x in offsets]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("qhd,thd->qht", qf, kf[s:e]) * scale
        outs.append(torch.einsum("qht,thd->qhd", scores.softmax(-1), vf[s:e]))
    return torch.stack(outs).to(queries.dtype)


def segment_pool_reference(queries, k, v, offsets, *, scale):
    Q, H, D = queries.shape
    T, S = k.shape[0], offsets.shape[0] - 1
    Dv = v.shape[-1]
    acc = acc_dtype(queries.dtype)
    seg = segment_ids(offsets, T)  # [T]
    scores = torch.einsum("qhd,thd->tqh", queries.to(acc) * scale, k.to(acc))  # [T, Q, H]
    # subtracting any per-segment constant leaves the softmax as it is: the max needs no gradient
    seg_max = torch.full((S, Q, H), float("-inf"), dtype=acc, device=k.device)
    seg_max = seg_max.scatter_reduce(0, seg.view(T, 1, 1).expand(T, Q, H), scores.detach(), "amax")
    p = torch.exp(scores - seg_max[seg])  # [T, Q, H]
    denom = torch.zeros(S, Q, H, dtype=acc, device=k.device).index_add(0, seg, p)
    weighted = p.unsqueeze(-1) * v.to(acc).unsqueeze(1)  # [T, Q, H, Dv]
    num = torch.zeros(S, Q, H, Dv, dtype=acc, device=k.device).index_add(0, seg, weighted)
    return (num / denom.unsqueeze(-1)).to(queries.dtype)


backends.register(OP, "reference", segment_pool_reference)
