"""The C++ extension's sliding-window attention (csrc/sliding_window_attention/): "cpu" and "cuda" backends.

The library declares three ops in ``torch.ops.agiformer_kernels``:
``sliding_window_attention_fwd(q, k, v, seg_start, seg_end, window, scale) -> (o, lse)``,
``sliding_window_attention_bwd(grad_o, q, k, v, o, lse, seg_start, seg_end, window, scale) -> (dq, dk, dv)``
and ``sliding_window_attention_step(q, k, v, k_cache!, v_cache!, pos, scale) -> o``. Their fake
(meta) kernels and the autograd of the forward are registered here once the library is loaded,
so they work under ``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from ... import backends
from .reference import OP, STEP_OP, acc_dtype, segment_bounds

LIBRARY = "sliding_window_attention"  # csrc/<LIBRARY>/
FWD = "agiformer_kernels::sliding_window_attention_fwd"
BWD = "agiformer_kernels::sliding_window_attention_bwd"
STEP = "agiformer_kernels::sliding_window_attention_step"
MAX_HEAD_DIM_CUDA = 128
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32, torch.float64)

_registered = False


def _fwd_fake(q, k, v, seg_start, seg_end, window, scale):
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[-1]), q.new_empty(B, H, L, dtype=acc_dtype(q.dtype))


def _bwd_fake(grad_o, q, k, v, o, lse, seg_start, seg_end, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _step_fake(q, k, v, k_cache, v_cache, pos, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, seg_start, seg_end, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seg_start, seg_end)
    ctx.window, ctx.scale = window, scale


@backends.without_autocast
def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, seg_start, seg_end = ctx.saved_tensors
    dq, dk, dv = torch.ops.agiformer_kernels.sliding_window_attention_bwd(
        grad_o, q, k, v, o, lse, seg_start, seg_end, ctx.window, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_fake(FWD, _fwd_fake)
    torch.library.register_fake(BWD, _bwd_fake)
    torch.library.register_fake(STEP, _step_fake)
    torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
    _registered = True


def _extension(device_type: str):
    """``available`` for one device type: the library loads and has that kernel; then hook up Python."""
    kernel_available = backends.extension_kernel(LIBRARY, "sliding_window_attention_fwd", device_type)

    def available(actual: str) -> backends.Reason:
        reason = kernel_available(actual)
        if reason is None:
            _register_python_side()
        return reason

    return available


def sliding_window_attention_cpp(q, k, v, window, *, scale=None, cu_seqlens=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seg_start, seg_end = segment_bounds(cu_seqlens, q.shape[1], q.device)
    o, _ = torch.ops.agiformer_kernels.sliding_window_attention_fwd(q, k, v, seg_start, seg_end, window, scale)
    return o


def sliding_window_attention_step_cpp(q, k, v, k_cache, v_cache, pos, *, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(pos, torch.Tensor):
        pos = pos.to(torch.int64)
    else:
        pos = torch.full((q.shape[0],), pos, dtype=torch.int64, device=q.device)
    return torch.ops.agiformer_kernels.sliding_window_attention_step.default(q, k, v, k_cache, v_cache, pos, scale)


def _check_cpu(q, k, v, window, *, scale=None, cu_seqlens=None) -> backends.Reason:
    if q.dtype not in CPU_DTYPES:
        return f"the C++ CPU kernel takes float32 or float64, got {q.dtype}"
    return None


def _check_cuda(q, k, v, window, *, scale=None, cu_seqlens=None) -> backends.Reason:
    if q.dtype not in CUDA_DTYPES:
        return f"the CUDA kernel takes float16, bfloat16 or float32, got {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM_CUDA:
        return f"the CUDA kernel takes head dims up to {MAX_HEAD_DIM_CUDA}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


def _check_step_caches(k_cache, v_cache) -> backends.Reason:
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "the kernel writes k_cache and v_cache in place and needs them contiguous"
    return None


def _check_step_cpu(q, k, v, k_cache, v_cache, pos, *, scale=None) -> backends.Reason:
    if q.dtype not in CPU_DTYPES:
        return f"the C++ CPU kernel takes float32 or float64, got {q.dtype}"
    return _check_step_caches(k_cache, v_cache)


def _check_step_cuda(q, k, v, k_cache, v_cache, pos, *, scale=None) -> backends.Reason:
    if q.dtype not in CUDA_DTYPES:
        return f"the CUDA kernel takes float16, bfloat16 or float32, got {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM_CUDA:
        return f"the CUDA kernel takes head dims up to {MAX_HEAD_DIM_CUDA}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return _check_step_caches(k_cache, v_cache)


backends.register(OP, "cpu", sliding_window_attention_cpp, check=_check_cpu, available=_extension("cpu"))
backends.register(OP, "cuda", sliding_window_attention_cpp, check=_check_cuda, available=_extension("cuda"))
backends.register(
    STEP_OP, "cpu", sliding_window_attention_step_cpp, check=_check_step_cpu, available=_extension("cpu")
)
backends.register(
    STEP_OP, "cuda", sliding_window_attention_step_cpp, check=_check_step_cuda, available=_extension("cuda")
)
