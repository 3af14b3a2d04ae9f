"""Learned-query pooling of variable-length segments (docs/ops.md §1.5)."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ... import backends
from ..common import check_float, check_index, check_same, check_scale
from . import cpp, reference  # noqa: F401  (each registers its backends)
from ._common import OP

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backend)


def _check_offsets(offsets: object, T: int, device: torch.device) -> torch.Tensor:
    check_index("offsets", offsets, 1)
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device} but k is on {device}")
    if offsets.numel() < 2:
        raise ValueError(f"offsets must hold at least 2 entries (S + 1 for S >= 1 segments), got {offsets.numel()}")
    if T >= 2**31:
        raise ValueError(f"offsets are int32 in the kernels: T must be < 2**31, got {T}")
    if not torch.compiler.is_compiling():  # data-dependent: skipped under torch.compile
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0 or last != T:
            raise ValueError(f"offsets must run from 0 to T = {T}, got {first} .. {last}")
        if bool((offsets[1:] <= offsets[:-1]).any()):
            raise ValueError("offsets must rise strictly: empty segments are an error")
    return offsets.to(torch.int32)


@backends.without_autocast
def segment_pool(
    queries: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Every segment pooled by Q learned queries: attention of each query over that segment's positions only.

    Args:
        queries: ``[Q, H, D]``, the learned queries (shared by all segments).
        k: ``[T, H, D]``, v: ``[T, H, Dv]``: the positions of all segments, packed (T = offsets[-1]).
        offsets: int32/int64 ``[S + 1]``, rising strictly from 0 to T (``segment_offsets``): segment s holds
            positions ``offsets[s] .. offsets[s+1] - 1``. Empty segments are an error.
        scale: score scale, default ``1/sqrt(D)``.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[S, Q, H, Dv]`` in the input dtype: out[s, q, h] = sum_t softmax_t(scale·queries[q, h]·k[t, h]) v[t, h]
        over t in segment s. Differentiable in queries, k and v.
    """
    for name, t, ndim in (("queries", queries, 3), ("k", k, 3), ("v", v, 3)):
        check_float(name, t, ndim)
    check_same(("queries", "k", "v"), (queries, k, v), "dtype")
    check_same(("queries", "k", "v"), (queries, k, v), "device")
    Q, H, D = queries.shape
    if Q < 1 or H < 1:
        raise ValueError(f"queries must have Q >= 1 and H >= 1, got shape {tuple(queries.shape)}")
    if k.shape[1:] != (H, D):
        raise ValueError(f"k must have shape [T, H, D] with [H, D] = {(H, D)} of queries, got {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have shape [T, H, Dv] with [T, H] = {tuple(k.shape[:2])} of k, got {tuple(v.shape)}")
    offsets = _check_offsets(offsets, k.shape[0], k.device)
    scale = check_scale(scale, D)
    args, kwargs = (queries, k, v, offsets), dict(scale=scale)
    return backends.select(OP, backend, k.device, *args, **kwargs)(*args, **kwargs)


__all__ = ["segment_pool"]
