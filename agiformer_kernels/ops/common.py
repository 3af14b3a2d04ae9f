"""Input checks shared by the public functions: each error names the argument at fault."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.int16)


def register_autograd(op: Any, fns: tuple[Callable, Callable]) -> None:
    """Attach ``(backward, setup_context)`` from an op's autograd factory to ``op``, an op name or a custom op."""
    backward, setup_context = fns
    torch.library.register_autograd(op, backward, setup_context=setup_context)


def check_float(name: str, t: object, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_index(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], what: str = "dtype") -> None:
    """All tensors share ``what`` ("dtype" or "device") with the first one."""
    first = getattr(tensors[0], what)
    for name, t in zip(names[1:], tensors[1:]):
        if getattr(t, what) != first:
            raise ValueError(f"{name} has {what} {getattr(t, what)} but {names[0]} has {first}")


def check_qkv(q: object, k: object, v: object, dims: str) -> None:
    """q and k of shape ``dims`` (e.g. "[B, L, H, D]"), v the same with its own last size Dv; one float dtype and
    one device."""
    ndim = dims.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, ndim)
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    check_shape("k", k, q.shape, f"{dims} of q")
    if v.shape[:-1] != q.shape[:-1]:
        lead = dims[1:dims.rindex(",")]
        raise ValueError(f"v must have shape [{lead}, Dv] with [{lead}] = {tuple(q.shape[:-1])} of q, "
                         f"got {tuple(v.shape)}")


def check_byte_range(name: str, t: torch.Tensor) -> None:
    """Byte ids lie in 0..255 (a data-dependent check: skipped under torch.compile)."""
    if torch.compiler.is_compiling() or t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{name} must hold byte values in 0..255, got values in {lo}..{hi}")


def check_scale(scale: object, head_dim: int) -> float:
    """The attention score scale as a float: ``scale``, or 1/√D when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_cu_seqlens(cu_seqlens: object, q: torch.Tensor) -> torch.Tensor:
    """Offsets ``[n + 1]`` of n sequences packed into q's one batch row, rising from 0 to L; as int32."""
    check_index("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of one: q must have B = 1, got B = {q.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets (n+1 for n sequences), got {cu_seqlens.numel()}")
    L = q.shape[1]
    if not torch.compiler.is_compiling():  # data-dependent: skipped under torch.compile
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != L or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must rise from 0 to L = {L} without decreasing, got {cu_seqlens.tolist()[:8]}"
                f"{' ...' if cu_seqlens.numel() > 8 else ''}"
            )
    if L >= 2**31:
        raise ValueError(f"cu_seqlens offsets are int32 in the kernels: L must be < 2**31, got {L}")
    return cu_seqlens.to(torch.int32)
