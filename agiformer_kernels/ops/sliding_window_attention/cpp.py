"""The C++ extension's sliding-window attention (csrc/sliding_window_attention/): the "cpu" and "cuda" backends.

``torch.ops.agiformer_kernels.sliding_window_attention_fwd`` / ``_bwd`` / ``_step`` follow the contract in
``_common``. Their fake kernels and the forward's autograd are attached when the library loads.
"""

from __future__ import annotations

import torch

from ... import backends
from ..common import register_autograd
from ._common import (
    LIBRARY, OP, STEP_OP, autograd, bwd_fake, check_step_caches, fwd_fake, segment_bounds, step_fake, step_positions,
)

FWD = "agiformer_kernels::sliding_window_attention_fwd"
MAX_HEAD_DIM_CUDA = 128
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32, torch.float64)


def _on_load() -> None:
    torch.library.register_fake(FWD, fwd_fake)
    torch.library.register_fake("agiformer_kernels::sliding_window_attention_bwd", bwd_fake)
    torch.library.register_fake("agiformer_kernels::sliding_window_attention_step", step_fake)
    register_autograd(FWD, autograd(torch.ops.agiformer_kernels.sliding_window_attention_bwd))


def load_library(device_type: str = "cpu") -> backends.Reason:
    """Load the extension (building it if needed) with its fake and autograd registrations; why not, or None."""
    return backends.extension_available(LIBRARY, "sliding_window_attention_fwd", device_type, _on_load)(device_type)


def sliding_window_attention_cpp(q, k, v, window, *, scale, cu_seqlens=None):
    seg_start, seg_end = segment_bounds(cu_seqlens, q.shape[1], q.device)
    o, _ = torch.ops.agiformer_kernels.sliding_window_attention_fwd(q, k, v, seg_start, seg_end, window, scale)
    return o


def sliding_window_attention_step_cpp(q, k, v, k_cache, v_cache, pos, *, scale):
    return torch.ops.agiformer_kernels.sliding_window_attention_step.default(
        q, k, v, k_cache, v_cache, step_positions(pos, q.shape[0], q.device), scale
    )


def _check_cpu(q, k, v, *args, **options) -> backends.Reason:
    if q.dtype not in CPU_DTYPES:
        return f"the C++ CPU kernel takes float32 or float64, got {q.dtype}"
    return None


def _check_cuda(q, k, v, *args, **options) -> backends.Reason:
    if q.dtype not in CUDA_DTYPES:
        return f"the CUDA kernel takes float16, bfloat16 or float32, got {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM_CUDA:
        return f"the CUDA kernel takes head dims up to {MAX_HEAD_DIM_CUDA}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


def _check_step_cpu(q, k, v, k_cache, v_cache, pos, **options) -> backends.Reason:
    return _check_cpu(q, k, v) or check_step_caches(q, k, v, k_cache, v_cache, pos)


def _check_step_cuda(q, k, v, k_cache, v_cache, pos, **options) -> backends.Reason:
    return _check_cuda(q, k, v) or check_step_caches(q, k, v, k_cache, v_cache, pos)


backends.register_extension(OP, sliding_window_attention_cpp, library=LIBRARY, kernel="sliding_window_attention_fwd",
                            on_load=_on_load, checks={"cpu": _check_cpu, "cuda": _check_cuda})
backends.register_extension(STEP_OP, sliding_window_attention_step_cpp, library=LIBRARY,
                            kernel="sliding_window_attention_step", on_load=_on_load,
                            checks={"cpu": _check_step_cpu, "cuda": _check_step_cuda})
