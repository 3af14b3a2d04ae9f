"""Causal sliding-window attention (SPEC §1.2) and its decode step."""

from __future__ import annotations

import importlib.util
from typing import Optional, Union

import torch

from ... import backends
from ..common import check_float, check_index, check_same, check_shape
from . import cpp, reference  # noqa: F401  (each registers its backends)

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backends)
from .reference import OP, STEP_OP


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the number of keys each query sees, itself included), got {window}")
    return window


def _check_scale(scale: object) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor) -> None:
    check_index("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of one: q must have B = 1, got B = {q.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets (n+1 for n sequences), got {cu_seqlens.numel()}")
    if torch.compiler.is_compiling():
        return
    L = q.shape[1]
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != L or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must rise from 0 to L = {L} without decreasing, got {cu_seqlens.tolist()[:8]}"
            f"{' ...' if cu_seqlens.numel() > 8 else ''}"
        )


@backends.without_autocast
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Causal attention of each query over its last ``window`` keys, itself included.

    Args:
        q, k: ``[B, L, H, D]``; v: ``[B, L, H, Dv]``; one float dtype, one device.
        window: query i attends keys j with ``i - window < j <= i`` (``window >= L``: plain causal).
        scale: score scale, default ``1/sqrt(D)``.
        cu_seqlens: int32/int64 ``[n+1]`` offsets of n sequences packed into B = 1; no query sees
            a key of another sequence.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, L, H, Dv]`` in the input dtype. Differentiable in q, k and v.
    """
    check_float("q", q, 4)
    check_float("k", k, 4)
    check_float("v", v, 4)
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    B, L, H, D = q.shape
    check_shape("k", k, (B, L, H, D), "[B, L, H, D] of q")
    if tuple(v.shape[:3]) != (B, L, H):
        raise ValueError(f"v must have shape [B, L, H, Dv] with [B, L, H] = {(B, L, H)} of q, got {tuple(v.shape)}")
    if L < 1:
        raise ValueError(f"q must hold at least one position, got shape {tuple(q.shape)}")
    window = _check_window(window)
    scale = _check_scale(scale)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, q)
    args, kwargs = (q, k, v, window), dict(scale=scale, cu_seqlens=cu_seqlens)
    return backends.select(OP, backend, q.device, *args, **kwargs)(*args, **kwargs)


@backends.without_autocast
def sliding_window_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: Union[int, torch.Tensor],
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One decode step of sliding-window attention over ring-buffer caches (inference only).

    Args:
        q, k: ``[B, H, D]``; v: ``[B, H, Dv]``: the new token of each sequence.
        k_cache: ``[B, W, H, D]``, v_cache: ``[B, W, H, Dv]`` with W = window, q's dtype: the last W
            keys/values, updated IN PLACE: k, v are written to slot ``pos % W``.
        pos: the new token's position, an int or an int64 ``[B]`` tensor (one per sequence).
        scale: score scale, default ``1/sqrt(D)``.
        backend: as for ``sliding_window_attention``.

    Returns:
        ``[B, H, Dv]`` in q's dtype: q attends the ``min(pos + 1, W)`` filled slots, itself included,
        equal to ``sliding_window_attention(..., window=W)`` at that position.
    """
    names = ("q", "k", "v", "k_cache", "v_cache")
    tensors = (q, k, v, k_cache, v_cache)
    for name, t in zip(names, tensors):
        check_float(name, t, 3 if name in ("q", "k", "v") else 4)
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    B, H, D = q.shape
    check_shape("k", k, (B, H, D), "[B, H, D] of q")
    Dv = v.shape[-1]
    if tuple(v.shape[:2]) != (B, H):
        raise ValueError(f"v must have shape [B, H, Dv] with [B, H] = {(B, H)} of q, got {tuple(v.shape)}")
    W = k_cache.shape[1]
    if tuple(k_cache.shape) != (B, W, H, D) or W < 1:
        raise ValueError(f"k_cache must have shape [B, W, H, D] with [B, H, D] = {(B, H, D)} of q, W >= 1, got {tuple(k_cache.shape)}")
    check_shape("v_cache", v_cache, (B, W, H, Dv), "[B, W, H, Dv] of k_cache and v")
    if isinstance(pos, torch.Tensor):
        check_index("pos", pos, 1)
        check_shape("pos", pos, (B,), "[B] of q")
        if pos.device != q.device:
            raise ValueError(f"pos is on {pos.device} but q is on {q.device}")
        if not torch.compiler.is_compiling() and B > 0 and int(pos.min()) < 0:
            raise ValueError(f"pos must be >= 0, got {pos.tolist()[:8]}")
    elif isinstance(pos, bool) or not isinstance(pos, int):
        raise TypeError(f"pos must be an int or an int64 tensor [B], got {type(pos).__name__}")
    elif pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    scale = _check_scale(scale)
    args, kwargs = (q, k, v, k_cache, v_cache, pos), dict(scale=scale)
    with torch.no_grad():
        return backends.select(STEP_OP, backend, q.device, *args, **kwargs)(*args, **kwargs)


__all__ = ["sliding_window_attention", "sliding_window_attention_step"]
