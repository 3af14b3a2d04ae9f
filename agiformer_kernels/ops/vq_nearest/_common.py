"""What every nearest-code backend shares: names, dtypes, fake kernels.

The C++ and Triton ops ``vq_nearest_fwd(z, codebook)`` return ``(index int64 [N], sqdist [N])``, the distance in
the accumulation dtype and recomputed as sum_d (z - c)^2 for the chosen code (the search itself ranks codes by
|c|^2 - 2 z·c, which drops the constant |z|^2). ``vq_ema_update(z, index, counts, sums, decay, eps)`` updates
counts and sums in place and returns the smoothed codebook.
"""

from __future__ import annotations

import torch

OP = "vq_nearest"
EMA_OP = "vq_ema_update"
LIBRARY = "vq_nearest"  # csrc/vq_nearest/


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and distance) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_sqdist(z: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sum_d (z - codebook[index])^2 in the accumulation dtype, [N]: no cancellation of |z|^2 - 2 z·c + |c|^2."""
    acc = acc_dtype(z.dtype)
    return (z.to(acc) - codebook.to(acc)[index]).square().sum(-1)


def smoothed_codebook(counts: torch.Tensor, sums: torch.Tensor, eps: float) -> torch.Tensor:
    """sums / the Laplace-smoothed counts: (counts + eps) / (n + K·eps) · n with n = sum(counts)."""
    K = counts.shape[0]
    n = counts.sum()
    smoothed = (counts + eps) / (n + K * eps) * n
    return sums / smoothed.unsqueeze(1)


def fwd_fake(z, codebook):
    N = z.shape[0]
    return z.new_empty(N, dtype=torch.int64), z.new_empty(N, dtype=acc_dtype(z.dtype))


def ema_fake(z, index, counts, sums, decay, eps):
    return torch.empty_like(sums)
