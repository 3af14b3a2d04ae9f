"""Nearest-code vector quantisation and the EMA codebook update (docs/ops.md §1.6)."""

from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch

from ... import backends
from ..common import check_float, check_index, check_same
from . import cpp, reference  # noqa: F401  (each registers its backends)
from ._common import EMA_OP, OP

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backend)


@backends.without_autocast
def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, backend: Optional[str] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of each vector by L2, searched tile by tile (no [N, K] matrix in memory).

    Args:
        z: ``[N, D]`` float; codebook: ``[K, D]``, z's dtype and device, K >= 1.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(index int64 [N], squared distance [N])``: index = argmin_k |z - c_k|^2 (ties: the lowest index, as
        ``torch.argmin``); the distance sum_d (z - c_index)^2 in the accumulation dtype (fp32; fp64 for fp64).
        Not differentiable (a VQ layer passes gradients straight through).
    """
    check_float("z", z, 2)
    check_float("codebook", codebook, 2)
    check_same(("z", "codebook"), (z, codebook), "dtype")
    check_same(("z", "codebook"), (z, codebook), "device")
    if codebook.shape[0] < 1:
        raise ValueError(f"codebook must hold at least one code, got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"codebook must have shape [K, D] with D = {z.shape[1]} of z, got {tuple(codebook.shape)}")
    if codebook.shape[0] >= 2**31:
        raise ValueError(f"codebook must have K < 2**31 codes, got {codebook.shape[0]}")
    with torch.no_grad():
        return backends.select(OP, backend, z.device, z, codebook)(z, codebook)


def _check_fraction(name: str, x: object, lo_open: bool) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x) or x > 1 or x < 0 or (lo_open and x == 0):
        raise ValueError(f"{name} must lie in {'(0' if lo_open else '[0'}, 1], got {x}")
    return x


@backends.without_autocast
def vq_ema_update(
    z: torch.Tensor,
    index: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    *,
    decay: float,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The EMA codebook update of a VQ-VAE (van den Oord et al.; Sonnet's ``VectorQuantizerEMA``), in place.

    Args:
        z: ``[N, D]`` float, the vectors quantised this step; index: int32/int64 ``[N]`` in 0..K-1, their codes
            (``vq_nearest``).
        counts: ``[K]`` float32/float64, the EMA of each code's assignment count: updated IN PLACE to
            ``decay·counts + (1 - decay)·n_k``.
        sums: ``[K, D]``, counts' dtype: the EMA of the sum of each code's vectors, updated IN PLACE to
            ``decay·sums + (1 - decay)·sum_{i: index_i = k} z_i``.
        decay: in [0, 1]. eps: Laplace smoothing, > 0.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        The new codebook ``[K, D]`` in sums' dtype: ``sums / ((counts + eps) / (n + K·eps) · n)`` row by row,
        n = sum(counts): Laplace smoothing keeps a code nothing was assigned to finite.
    """
    check_float("z", z, 2)
    check_index("index", index, 1)
    check_float("counts", counts, 1)
    check_float("sums", sums, 2)
    if counts.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"counts must be float32 or float64 (the EMA accumulates), got {counts.dtype}")
    check_same(("counts", "sums"), (counts, sums), "dtype")
    check_same(("z", "index", "counts", "sums"), (z, index, counts, sums), "device")
    N, D = z.shape
    K = counts.shape[0]
    if K < 1:
        raise ValueError("counts must hold at least one code")
    if tuple(sums.shape) != (K, D):
        raise ValueError(f"sums must have shape [K, D] = {(K, D)} of counts and z, got {tuple(sums.shape)}")
    if tuple(index.shape) != (N,):
        raise ValueError(f"index must have shape [N] = ({N},) of z, got {tuple(index.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if not torch.compiler.is_compiling() and N > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"index must lie in 0..{K - 1}, got values in {lo}..{hi}")
    decay = _check_fraction("decay", decay, lo_open=False)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    index = index.to(torch.int64)
    kwargs = dict(decay=decay, eps=float(eps))
    with torch.no_grad():
        return backends.select(EMA_OP, backend, z.device, z, index, counts, sums, **kwargs)(
            z, index, counts, sums, **kwargs)


__all__ = ["vq_nearest", "vq_ema_update"]
