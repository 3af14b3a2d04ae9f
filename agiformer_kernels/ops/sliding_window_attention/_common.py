"""What every sliding-window attention backend shares: names, dtypes, the kernels' forward/backward contract.

The C++ and Triton forward ops take ``(q, k, v, seg_start, seg_end, window, scale)`` and return
``(o, lse)`` (lse ``[B, H, L]`` in the accumulation dtype, kept for the backward); the backward ops take
``(grad_o, q, k, v, o, lse, seg_start, seg_end, window, scale)`` and return ``(dq, dk, dv)``; the step ops
take ``(q, k, v, k_cache, v_cache, pos, scale)``, write k, v to ring slot ``pos % W`` and return o.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ... import backends

OP = "sliding_window_attention"
STEP_OP = "sliding_window_attention_step"
LIBRARY = "sliding_window_attention"  # csrc/sliding_window_attention/


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and log-sum-exp) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_bounds(
    cu_seqlens: Optional[torch.Tensor], L: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the start and end (exclusive) of its sequence, int32 [L]: the kernels' view of cu_seqlens."""
    pos = torch.arange(L, device=device, dtype=torch.int64)
    if cu_seqlens is None:
        return torch.zeros(L, dtype=torch.int32, device=device), torch.full((L,), L, dtype=torch.int32, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seg = torch.searchsorted(cu[1:], pos, right=True)
    return cu[seg].to(torch.int32), cu[seg + 1].to(torch.int32)


def step_positions(pos: Union[int, torch.Tensor], B: int, device: torch.device) -> torch.Tensor:
    """The decode step's position of each sequence as the kernels take it: int64 ``[B]``."""
    if isinstance(pos, torch.Tensor):
        return pos.to(torch.int64)
    return torch.full((B,), pos, dtype=torch.int64, device=device)


def fwd_fake(q, k, v, seg_start, seg_end, window, scale):
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[-1]), q.new_empty(B, H, L, dtype=acc_dtype(q.dtype))


def bwd_fake(grad_o, q, k, v, o, lse, seg_start, seg_end, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def step_fake(q, k, v, k_cache, v_cache, pos, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def autograd(bwd: Callable) -> tuple[Callable, Callable]:
    """``backward`` and ``setup_context`` of a forward op, calling the backward op ``bwd``."""

    def setup_context(ctx, inputs, output):
        q, k, v, seg_start, seg_end, window, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, seg_start, seg_end)
        ctx.window, ctx.scale = window, scale

    @backends.without_autocast
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, seg_start, seg_end = ctx.saved_tensors
        dq, dk, dv = bwd(grad_o.contiguous(), q, k, v, o, lse, seg_start, seg_end, ctx.window, ctx.scale)
        return dq, dk, dv, None, None, None, None

    return backward, setup_context


def check_step_caches(q, k, v, k_cache, v_cache, pos, **options) -> backends.Reason:
    """The kernels write k_cache and v_cache in place through raw pointers."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "the kernel writes k_cache and v_cache in place and needs them contiguous"
    return None
