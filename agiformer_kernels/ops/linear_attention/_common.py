"""What every linear-attention backend shares: names, dtypes, the kernels' forward/backward contract.

The C++ and Triton forward ops take ``(q, k, v, S0, z0, cu_seqlens, feature_map, feature_eps, scale, eps,
normalize)`` and return ``(o, den, S_L, z_L, chunk_S, chunk_z)``: den ``[B, H, L]`` the per-token denominator
q̂ᵀz + eps (empty without ``normalize``), chunk_S / chunk_z the state before each chunk of C = 64 tokens (Sᵀ,
O(L/C·D·Dv)), kept so the backward finishes in one reverse sweep. The backward ops take ``(do, dS, dz, q, k, v,
o, den, chunk_S, chunk_z, cu_seqlens, *options)`` and return ``(dq, dk, dv, dS0, dz0)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ... import backends

OP = "linear_attention"
STEP_OP = "linear_attention_step"
LIBRARY = "linear_attention"  # csrc/linear_attention/
CHUNK = 64  # kChunk in csrc/linear_attention/linear_attention.cpp
FEATURE_MAPS = ("elu+1", "identity")

State = tuple[torch.Tensor, torch.Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and state) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(B: int, L: int, n_seq: int, packed: bool) -> int:
    """Rows of the saved chunk-state tensors: B·⌈L/C⌉, or ⌊T/C⌋ + n when packed (each segment may start mid-chunk)."""
    return L // CHUNK + n_seq if packed else B * -(-L // CHUNK)


def last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need unit stride along the head dim (true of projection slices)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def fwd_fake(states_transposed: bool) -> Callable:
    """The fake (meta) kernel of a forward op; the C++ kernels keep chunk_S as Sᵀ ``[rows, H, Dv, D]``, the Triton
    ones as S ``[rows, H, D, Dv]`` (each reads its own layout back in its backward)."""

    def fake(q, k, v, S0, z0, cu_seqlens, feature_map, feature_eps, scale, eps, normalize):
        B, L, H, D = q.shape
        Dv = v.shape[-1]
        n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        rows = chunk_rows(B, L, n, cu_seqlens is not None)
        sdt = acc_dtype(q.dtype)
        return (
            q.new_empty(B, L, H, Dv),
            q.new_empty(B, H, L, dtype=sdt) if normalize else q.new_empty(0, dtype=sdt),
            q.new_empty(n, H, D, Dv, dtype=sdt),
            q.new_empty(n, H, D, dtype=sdt),
            q.new_empty(rows, H, Dv, D, dtype=sdt) if states_transposed else q.new_empty(rows, H, D, Dv, dtype=sdt),
            q.new_empty(rows, H, D, dtype=sdt),
        )

    return fake


def bwd_fake(do, dS, dz, q, k, v, o, den, chunk_S, chunk_z, cu_seqlens, *options):
    H, D = q.shape[2], q.shape[3]
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sdt = acc_dtype(q.dtype)
    return (
        q.new_empty(q.shape),
        q.new_empty(k.shape),
        q.new_empty(v.shape),
        q.new_empty(n, H, D, v.shape[-1], dtype=sdt),
        q.new_empty(n, H, D, dtype=sdt),
    )


def step_fake(q, k, v, S, z, feature_map, feature_eps, scale, eps, normalize):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def autograd(bwd: Callable) -> tuple[Callable, Callable]:
    """``backward`` and ``setup_context`` of a forward op, calling the backward op ``bwd``."""

    def setup_context(ctx, inputs, output):
        q, k, v, S0, z0, cu_seqlens, feature_map, feature_eps, scale, eps, normalize = inputs
        o, den, _, _, chunk_S, chunk_z = output
        ctx.save_for_backward(q, k, v, o, den, chunk_S, chunk_z, cu_seqlens)
        ctx.options = (feature_map, feature_eps, scale, eps, normalize)
        ctx.has_state = S0 is not None

    @backends.without_autocast
    def backward(ctx, do, dden, dS, dz, dchunk_S, dchunk_z):
        q, k, v, o, den, chunk_S, chunk_z, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dS0, dz0 = bwd(
            last_contiguous(do),
            None if dS is None else dS.contiguous(),
            None if dz is None else dz.contiguous(),
            q, k, v, o, den, chunk_S, chunk_z, cu_seqlens,
            *ctx.options,
        )
        if not ctx.has_state:
            dS0 = dz0 = None
        return dq, dk, dv, dS0, dz0, None, None, None, None, None, None

    return backward, setup_context


def run_forward(fwd, q, k, v, *, feature_map, feature_eps, scale, eps, normalize, initial_state, output_final_state,
                cu_seqlens):
    """The public function's result from ``fwd``, a forward op of the schema above (C++ or Triton)."""
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (t.contiguous() for t in initial_state)
    o, _, S, z, _, _ = fwd(
        last_contiguous(q), last_contiguous(k), last_contiguous(v), S0, z0, cu_seqlens,
        feature_map, feature_eps, scale, eps, normalize,
    )
    return (o, (S, z)) if output_final_state else o


def check_step_state(q, k, v, state, **options) -> backends.Reason:
    """The kernels update (S, z) in place through raw pointers."""
    S, z = state
    if not (S.is_contiguous() and z.is_contiguous()):
        return "the state (S, z) must be contiguous to be updated in place"
    return None
