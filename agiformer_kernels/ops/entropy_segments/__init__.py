"""Entropy segmentation of a byte sequence (docs/ops.md §1.4) and the segment offsets it gives."""

from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch

from ... import backends
from ..common import check_cu_seqlens, check_float
from . import cpp, reference  # noqa: F401  (each registers its backends)
from ._common import OFFSETS_OP, OP, RULES

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backend)


def _check_number(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return float(x)


@backends.without_autocast
def entropy_segments(
    logits: torch.Tensor,
    *,
    rule: str,
    threshold: Optional[float],
    delta: Optional[float] = None,
    max_len: Optional[int] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-byte entropies and the segment starts they give.

    H_t = -sum_v p_v log p_v (nats) of softmax(logits[b, t]): the entropy of the prediction made at t,
    i.e. of byte t + 1. The rules read it one position apart:

    - ``"delta"`` (Abstractinator): position t >= 1 starts a segment when H_t > H_{t-1} + delta, or
      H_t > threshold when threshold is given; position 0 always starts one. A position starts a segment
      when the prediction made *at* it jumps.
    - ``"global"`` (BLT): byte j starts a patch when the entropy of *its own* prediction, made at j - 1,
      exceeds threshold: H_{j-1} > threshold; bytes 0 and 1 always start one. The same entropy row thus
      cuts one position later under ``"global"`` than under ``"delta"``.

    Args:
        logits: ``[B, L, V]`` float, the byte LM's next-byte logits.
        rule: ``"delta"`` or ``"global"``.
        threshold: a float (``"global"``: required; ``"delta"``: the absolute cut, or None for none).
        delta: ``"delta"`` only, required there: the jump over the previous entropy that cuts.
        max_len: int >= 1 or None: a segment reaching max_len positions is cut after them.
        cu_seqlens: int32/int64 ``[n+1]`` offsets of n sequences packed into B = 1: each sequence's first
            positions count as positions 0 (and 1) above, and no segment crosses a sequence boundary.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(entropy [B, L], starts [B, L] bool)``; entropy in the accumulation dtype (fp32; fp64 for fp64
        logits). Not differentiable (the segmentation is a discrete decision).
    """
    check_float("logits", logits, 3)
    B, L, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have a vocabulary V >= 1, got shape {tuple(logits.shape)}")
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {tuple(RULES)}, got {rule!r}")
    if threshold is not None:
        threshold = _check_number("threshold", threshold)
    if rule == "global":
        if threshold is None:
            raise ValueError("threshold is required for rule='global'")
        if delta is not None:
            raise ValueError("delta applies only to rule='delta'")
    else:
        if delta is None:
            raise ValueError("delta is required for rule='delta'")
        delta = _check_number("delta", delta)
    if max_len is not None:
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise TypeError(f"max_len must be an int or None, got {type(max_len).__name__}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into a batch of one: logits must have B = 1, got B = {B}")
        cu_seqlens = check_cu_seqlens(cu_seqlens, logits)
    kwargs = dict(rule=rule, threshold=threshold, delta=delta, max_len=max_len, cu_seqlens=cu_seqlens)
    with torch.no_grad():
        return backends.select(OP, backend, logits.device, logits, **kwargs)(logits, **kwargs)


def segment_offsets(starts: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Segment offsets of a start mask, as ``cu_seqlens``: int32 ``[S + 1]`` over the row-major flattened batch.

    Args:
        starts: ``[B, L]`` bool (from ``entropy_segments``). Each row's position 0 starts a segment whatever
            its value: segments never cross rows.
        backend: ``None``/``"auto"`` or ``"reference"`` (an O(B·L) scan: the only backend).

    Returns:
        int32 ``[S + 1]``: segment s holds flat positions ``offsets[s] .. offsets[s+1] - 1`` of ``[B·L]``;
        ``offsets[0] = 0``, ``offsets[-1] = B·L``. The number of segments depends on the values, so under
        ``torch.compile`` this is a data-dependent shape.
    """
    if not isinstance(starts, torch.Tensor):
        raise TypeError(f"starts must be a torch.Tensor, got {type(starts).__name__}")
    if starts.dtype != torch.bool:
        raise TypeError(f"starts must be a bool tensor, got {starts.dtype}")
    if starts.dim() != 2:
        raise ValueError(f"starts must have 2 dimensions [B, L], got shape {tuple(starts.shape)}")
    if starts.shape[1] < 1:
        raise ValueError(f"starts must hold at least one position per row, got shape {tuple(starts.shape)}")
    if starts.numel() >= 2**31:
        raise ValueError(f"offsets are int32: starts must have B·L < 2**31, got {starts.numel()}")
    return backends.select(OFFSETS_OP, backend, starts.device, starts)(starts)


__all__ = ["entropy_segments", "segment_offsets"]
