"""Input checks shared by the public functions: each error names the argument at fault."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.int16)


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


def check_byte_range(name: str, t: torch.Tensor) -> None:
    """Byte ids lie in 0..255 (a data-dependent check: skipped under torch.compile)."""
    if torch.compiler.is_compiling() or t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{name} must hold byte values in 0..255, got values in {lo}..{hi}")
