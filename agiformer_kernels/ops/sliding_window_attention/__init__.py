"""Causal sliding-window attention (docs/ops.md §1.2) and its decode step."""

from __future__ import annotations

import importlib.util
from typing import Optional, Union

import torch

from ... import backends
from ..common import (
    FLOAT_DTYPES, check_cu_seqlens, check_float, check_index, check_qkv, check_same, check_scale, check_shape,
)
from . import cpp, reference  # noqa: F401  (each registers its backends)
from ._common import OP, STEP_OP

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backends)


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the number of keys each query sees, itself included), got {window}")
    return window


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
    check_qkv(q, k, v, "[B, L, H, D]")
    B, L, H, D = q.shape
    if L < 1:
        raise ValueError(f"q must hold at least one position, got shape {tuple(q.shape)}")
    window = _check_window(window)
    scale = check_scale(scale, D)
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, q)
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
    if not _step_inputs_ok(q, k, v, k_cache, v_cache, pos):  # the full checks, for their error messages
        _check_step_inputs(q, k, v, k_cache, v_cache, pos)
    scale = float(q.shape[-1] ** -0.5) if scale is None else check_scale(scale, q.shape[-1])
    args, kwargs = (q, k, v, k_cache, v_cache, pos), dict(scale=scale)
    with torch.no_grad():
        return backends.select(STEP_OP, backend, q.device, *args, **kwargs)(*args, **kwargs)


def _step_inputs_ok(q, k, v, k_cache, v_cache, pos) -> bool:
    """One cheap test of the common case of everything the step checks: a decode loop calls it per token."""
    try:
        shape, dtype, device = q.shape, q.dtype, q.device
        v_shape, c_shape = v.shape, k_cache.shape
        return (
            len(shape) == 3 and k.shape == shape and len(v_shape) == 3 and v_shape[:2] == shape[:2]
            and dtype in FLOAT_DTYPES and k.dtype == dtype and v.dtype == dtype
            and k_cache.dtype == dtype and v_cache.dtype == dtype
            and len(c_shape) == 4 and c_shape[1] >= 1 and c_shape == (shape[0], c_shape[1], shape[1], shape[2])
            and v_cache.shape == (shape[0], c_shape[1], shape[1], v_shape[2])
            and k.device == device and v.device == device and k_cache.device == device and v_cache.device == device
            and type(pos) is int and pos >= 0
        )
    except (TypeError, ValueError, AttributeError):  # not tensors: the full checks say what
        return False


def _check_step_inputs(q, k, v, k_cache, v_cache, pos) -> None:
    check_qkv(q, k, v, "[B, H, D]")
    check_float("k_cache", k_cache, 4)
    check_float("v_cache", v_cache, 4)
    names, tensors = ("q", "k_cache", "v_cache"), (q, k_cache, v_cache)
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    B, H, D = q.shape
    Dv = v.shape[-1]
    W = k_cache.shape[1]
    if tuple(k_cache.shape) != (B, W, H, D) or W < 1:
        raise ValueError(f"k_cache must have shape [B, W, H, D] with [B, H, D] = {(B, H, D)} of q, W >= 1, "
                         f"got {tuple(k_cache.shape)}")
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


__all__ = ["sliding_window_attention", "sliding_window_attention_step"]
