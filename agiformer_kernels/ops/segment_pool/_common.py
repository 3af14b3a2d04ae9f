"""What every segment-pooling backend shares: names, dtypes, the kernels' forward/backward contract.

The C++ and Triton forward ops take ``(queries, k, v, offsets, scale)`` with offsets int32 ``[S + 1]`` and return
``(out, lse)``: out ``[S, Q, H, Dv]`` in the input dtype, lse ``[S, Q, H]`` (natural log, scaled scores) in the
accumulation dtype, kept for the backward. The backward ops take ``(grad_out, queries, k, v, offsets, out, lse,
scale)`` and return ``(d_queries, dk, dv)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ... import backends

OP = "segment_pool"
LIBRARY = "segment_pool"  # csrc/segment_pool/


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and log-sum-exp) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_ids(offsets: torch.Tensor, T: int) -> torch.Tensor:
    """The segment of each position, int64 [T], for offsets [S + 1] covering 0..T."""
    lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=T)


def fwd_fake(queries, k, v, offsets, scale):
    Q, H, _ = queries.shape
    S = offsets.shape[0] - 1
    return (queries.new_empty(S, Q, H, v.shape[-1]),
            queries.new_empty(S, Q, H, dtype=acc_dtype(queries.dtype)))


def bwd_fake(grad_out, queries, k, v, offsets, out, lse, scale):
    return torch.empty_like(queries), torch.empty_like(k), torch.empty_like(v)


def autograd(bwd: Callable) -> tuple[Callable, Callable]:
    """``backward`` and ``setup_context`` of a forward op, calling the backward op ``bwd``."""

    def setup_context(ctx, inputs, output):
        queries, k, v, offsets, scale = inputs
        out, lse = output
        ctx.save_for_backward(queries, k, v, offsets, out, lse)
        ctx.scale = scale

    @backends.without_autocast
    def backward(ctx, grad_out, grad_lse):
        queries, k, v, offsets, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(grad_out.contiguous(), queries, k, v, offsets, out, lse, ctx.scale)
        return dq, dk, dv, None, None

    return backward, setup_context
