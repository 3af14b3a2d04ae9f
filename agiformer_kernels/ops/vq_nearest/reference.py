"""Pure-PyTorch nearest-code search and EMA codebook update: the naive oracle and the efficient fallback.

- ``naive_*``: one vector at a time, exact distances sum_d (z - c)^2. The oracle.
- ``vq_nearest_reference``: tiles of ``ROWS`` vectors × ``CODES`` codes ranked by |c|^2 - 2 z·c (one addmm per
  tile), a running minimum across code tiles, never an [N, K] matrix; the chosen code's distance recomputed
  exactly. Ties go to the lowest index, as ``torch.argmin``.
"""

from __future__ import annotations

import torch

from ... import backends
from ._common import EMA_OP, OP, acc_dtype, exact_sqdist, smoothed_codebook

ROWS = 4096
CODES = 1024


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


def naive_vq_nearest(z, codebook):
    """[N, D], [K, D] -> (index int64 [N], squared distance [N]), one row at a time."""
    acc = acc_dtype(z.dtype)
    index, dist = [], []
    for row in z.to(acc):
        d = (codebook.to(acc) - row).square().sum(-1)
        i = int(torch.argmin(d))  # the first of equal minima
        index.append(i)
        dist.append(d[i])
    return torch.tensor(index, dtype=torch.int64), torch.stack(dist) if dist else torch.zeros(0, dtype=acc)


def naive_vq_ema_update(z, index, counts, sums, *, decay, eps):
    """counts <- decay·counts + (1 - decay)·n_k, sums <- decay·sums + (1 - decay)·sum of the z assigned to k, in
    place; returns sums / Laplace-smoothed counts."""
    K = counts.shape[0]
    batch_counts = torch.zeros_like(counts)
    batch_sums = torch.zeros_like(sums)
    for i in range(z.shape[0]):
        batch_counts[int(index[i])] += 1
        batch_sums[int(index[i])] += z[i].to(sums.dtype)
    counts.mul_(decay).add_(batch_counts * (1 - decay))
    sums.mul_(decay).add_(batch_sums * (1 - decay))
    n = float(counts.sum())
    return torch.stack([sums[k] / ((float(counts[k]) + eps) / (n + K * eps) * n) for k in range(K)])


# ---------------------------------------------------------------------------------------------
# The efficient fallback
# ---------------------------------------------------------------------------------------------


def vq_nearest_reference(z, codebook):
    N, K = z.shape[0], codebook.shape[0]
    acc = acc_dtype(z.dtype)
    cb = codebook.to(acc)
    c_norm = cb.square().sum(-1)  # [K]
    index = torch.empty(N, dtype=torch.int64, device=z.device)
    for r in range(0, N, ROWS):
        zr = z[r : r + ROWS].to(acc)
        best = torch.full((zr.shape[0],), float("inf"), dtype=acc, device=z.device)
        best_i = torch.zeros(zr.shape[0], dtype=torch.int64, device=z.device)
        for c in range(0, K, CODES):
            scores = torch.addmm(c_norm[c : c + CODES], zr, cb[c : c + CODES].t(), alpha=-2)  # [rows, codes]
            i = scores.argmin(-1)
            v = scores.gather(1, i.unsqueeze(1)).squeeze(1)
            better = v < best  # strict: an equal score in a later tile keeps the earlier index
            best = torch.where(better, v, best)
            best_i = torch.where(better, i + c, best_i)
        index[r : r + ROWS] = best_i
    return index, exact_sqdist(z, codebook, index)


def vq_ema_update_reference(z, index, counts, sums, *, decay, eps):
    K = counts.shape[0]
    batch_counts = torch.bincount(index, minlength=K).to(counts.dtype)
    batch_sums = torch.zeros_like(sums).index_add_(0, index, z.to(sums.dtype))
    counts.mul_(decay).add_(batch_counts, alpha=1 - decay)
    sums.mul_(decay).add_(batch_sums, alpha=1 - decay)
    return smoothed_codebook(counts, sums, eps)


backends.register(OP, "reference", vq_nearest_reference)
backends.register(EMA_OP, "reference", vq_ema_update_reference)
