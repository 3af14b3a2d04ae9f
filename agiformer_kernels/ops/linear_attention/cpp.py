"""The C++ extension's linear-attention ops (csrc/linear_attention/), serving the "cpu" and "cuda" backends.

``torch.ops.agiformer_kernels.linear_attention_fwd`` returns (o, den, S_L, z_L, chunk_S, chunk_z), the last
three kept for the backward: den [B, H, L] the per-token denominator q̂ᵀz + eps (empty without
``normalize``), chunk_S / chunk_z the state before each chunk of C = 64 tokens (Sᵀ, so O(L/C·D·Dv)),
which lets ``linear_attention_bwd`` finish in one reverse sweep.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import backends
from .reference import State, acc_dtype

OP_LIB = "linear_attention"
CHUNK = 64  # kChunk in csrc/linear_attention/linear_attention.cpp
MAX_CUDA_HEAD_DIM = 128

_registered = False


def chunk_rows(B: int, L: int, n_seq: int, packed: bool) -> int:
    """Rows of the saved chunk-state tensors (chunk_rows in the C++): B·⌈L/C⌉, or ⌊T/C⌋ + n when packed."""
    return L // CHUNK + n_seq if packed else B * -(-L // CHUNK)


def _register_python_side() -> None:
    """Fake kernels and autograd for the C++ ops; they can only be attached once the library is loaded."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("agiformer_kernels::linear_attention_fwd")
    def _fwd_fake(q, k, v, S0, z0, cu_seqlens, feature_map, feature_eps, scale, eps, normalize):
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
            q.new_empty(rows, H, Dv, D, dtype=sdt),
            q.new_empty(rows, H, D, dtype=sdt),
        )

    @torch.library.register_fake("agiformer_kernels::linear_attention_bwd")
    def _bwd_fake(do, dS, dz, q, k, v, o, den, chunk_S, chunk_z, cu_seqlens, *options):
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

    @torch.library.register_fake("agiformer_kernels::linear_attention_step")
    def _step_fake(q, k, v, S, z, feature_map, feature_eps, scale, eps, normalize):
        return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])

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
        dq, dk, dv, dS0, dz0 = torch.ops.agiformer_kernels.linear_attention_bwd(
            _last_contiguous(do),
            None if dS is None else dS.contiguous(),
            None if dz is None else dz.contiguous(),
            q,
            k,
            v,
            o,
            den,
            chunk_S,
            chunk_z,
            cu_seqlens,
            *ctx.options,
        )
        if not ctx.has_state:
            dS0 = dz0 = None
        return dq, dk, dv, dS0, dz0, None, None, None, None, None, None

    torch.library.register_autograd(
        "agiformer_kernels::linear_attention_fwd", backward, setup_context=setup_context
    )


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need unit stride along the head dim (true of projection slices)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def run_forward(
    fwd,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
    initial_state: Optional[State],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
):
    """The public function's result from ``fwd``, an op of ``linear_attention_fwd``'s schema (C++ or Triton)."""
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (t.contiguous() for t in initial_state)
    o, _, S, z, _, _ = fwd(
        _last_contiguous(q), _last_contiguous(k), _last_contiguous(v), S0, z0, cu_seqlens,
        feature_map, feature_eps, scale, eps, normalize,
    )
    return (o, (S, z)) if output_final_state else o


def linear_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options):
    return run_forward(torch.ops.agiformer_kernels.linear_attention_fwd, q, k, v, **options)


def linear_attention_step_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
) -> torch.Tensor:
    # Called once per generated token: the op itself makes a non-unit-stride head dim contiguous.
    return torch.ops.agiformer_kernels.linear_attention_step.default(
        q, k, v, state[0], state[1], feature_map, feature_eps, scale, eps, normalize
    )


def _check_step_state(q, k, v, state, **kwargs) -> Optional[str]:
    S, z = state
    if not (S.is_contiguous() and z.is_contiguous()):
        return "the state (S, z) must be contiguous to be updated in place"
    return None


def _check_cuda(q, k, v, *args, **kwargs) -> Optional[str]:
    if q.dtype == torch.float64:
        return "the CUDA kernels take float32, float16 or bfloat16 (fp32 state), not float64"
    if q.shape[-1] > MAX_CUDA_HEAD_DIM or v.shape[-1] > MAX_CUDA_HEAD_DIM:
        return f"the CUDA kernels take head dims up to {MAX_CUDA_HEAD_DIM}, got D = {q.shape[-1]}, Dv = {v.shape[-1]}"
    return None


def _check_cuda_step(q, k, v, state, **kwargs) -> Optional[str]:
    return _check_cuda(q, k, v) or _check_step_state(q, k, v, state)


def _available(kernel: str, device_type: str):
    extension_available = backends.extension_kernel(OP_LIB, kernel, device_type)

    def available(actual: str) -> Optional[str]:
        reason = extension_available(actual)
        if reason is None:
            _register_python_side()
        return reason

    return available


def load_library(device_type: str = "cpu") -> Optional[str]:
    """Load the extension (building it if needed) with its fake and autograd registrations; why not, or None."""
    return _available("linear_attention_fwd", device_type)(device_type)


backends.register(
    "linear_attention", "cpu", linear_attention_cpp, available=_available("linear_attention_fwd", "cpu")
)
backends.register(
    "linear_attention_step",
    "cpu",
    linear_attention_step_cpp,
    check=_check_step_state,
    available=_available("linear_attention_step", "cpu"),
)
backends.register(
    "linear_attention",
    "cuda",
    linear_attention_cpp,
    check=_check_cuda,
    available=_available("linear_attention_fwd", "cuda"),
)
backends.register(
    "linear_attention_step",
    "cuda",
    linear_attention_step_cpp,
    check=_check_cuda_step,
    available=_available("linear_attention_step", "cuda"),
)
