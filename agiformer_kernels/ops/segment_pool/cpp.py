"""The C++ extension's segment pooling (csrc/segment_pool/): the "cpu" and "cuda" backends.

``torch.ops.agiformer_kernels.segment_pool_fwd`` / ``_bwd`` follow the contract in ``_common``. Their fake kernels
and the forward's autograd are attached when the library loads.
"""

from __future__ import annotations

import torch

from ... import backends
from ..common import register_autograd
from ._common import LIBRARY, OP, autograd, bwd_fake, fwd_fake

FWD = "agiformer_kernels::segment_pool_fwd"
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM_CUDA = 128
MAX_QUERIES_CUDA = 16


def _on_load() -> None:
    torch.library.register_fake(FWD, fwd_fake)
    torch.library.register_fake("agiformer_kernels::segment_pool_bwd", bwd_fake)
    register_autograd(FWD, autograd(torch.ops.agiformer_kernels.segment_pool_bwd))


def segment_pool_cpp(queries, k, v, offsets, *, scale):
    out, _ = torch.ops.agiformer_kernels.segment_pool_fwd(queries, k, v, offsets, scale)
    return out


def _check_cpu(queries, k, v, offsets, **options) -> backends.Reason:
    if queries.dtype not in CPU_DTYPES:
        return f"the C++ CPU kernel takes float32 or float64, got {queries.dtype}"
    return None


def _check_cuda(queries, k, v, offsets, **options) -> backends.Reason:
    if queries.dtype not in CUDA_DTYPES:
        return f"the CUDA kernels take float16, bfloat16 or float32, got {queries.dtype}"
    if max(queries.shape[-1], v.shape[-1]) > MAX_HEAD_DIM_CUDA:
        return f"the CUDA kernels take head dims up to {MAX_HEAD_DIM_CUDA}, got D={queries.shape[-1]}, Dv={v.shape[-1]}"
    if queries.shape[0] > MAX_QUERIES_CUDA:
        return f"the CUDA kernels take up to {MAX_QUERIES_CUDA} queries, got Q={queries.shape[0]}"
    if queries.shape[1] > 65535:
        return f"the CUDA kernels take up to 65535 heads, got H={queries.shape[1]}"
    return None


backends.register_extension(OP, segment_pool_cpp, library=LIBRARY, kernel="segment_pool_fwd", on_load=_on_load,
                            checks={"cpu": _check_cpu, "cuda": _check_cuda})
