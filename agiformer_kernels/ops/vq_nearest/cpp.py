"""The C++ extension's nearest-code search and EMA update (csrc/vq_nearest/): the "cpu" and "cuda"
backends.

``torch.ops.agiformer_kernels.vq_nearest_fwd`` and ``vq_ema_update`` follow the contract in ``_common``; their
fake kernels are attached when the library loads.
"""

from __future__ import annotations

import torch

from ... import backends
from ._common import EMA_OP, LIBRARY, OP, ema_fake, fwd_fake

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _on_load() -> None:
    torch.library.register_fake("agiformer_kernels::vq_nearest_fwd", fwd_fake)
    torch.library.register_fake("agiformer_kernels::vq_ema_update", ema_fake)


def vq_nearest_cpp(z, codebook):
    return torch.ops.agiformer_kernels.vq_nearest_fwd(z, codebook)


def vq_ema_update_cpp(z, index, counts, sums, *, decay, eps):
    return torch.ops.agiformer_kernels.vq_ema_update(z, index, counts, sums, decay, eps)


def _check_cpu(z, codebook) -> backends.Reason:
    if z.dtype not in CPU_DTYPES:
        return f"the C++ CPU kernel takes float32 or float64, got {z.dtype}"
    return None


def _check_cuda(z, codebook) -> backends.Reason:
    if z.dtype not in CUDA_DTYPES:
        return f"the CUDA kernels take float16, bfloat16 or float32, got {z.dtype}"
    return None


def _ema_check(kernel: str):
    def check(z, index, counts, sums, **options) -> backends.Reason:
        if z.dtype != sums.dtype:
            return f"the {kernel} takes z in the dtype of sums ({sums.dtype}), got {z.dtype}"
        if not (counts.is_contiguous() and sums.is_contiguous()):
            return f"the {kernel} updates counts and sums in place and needs them contiguous"
        return None

    return check


backends.register_extension(OP, vq_nearest_cpp, library=LIBRARY, kernel="vq_nearest_fwd", on_load=_on_load,
                            checks={"cpu": _check_cpu, "cuda": _check_cuda})
backends.register_extension(EMA_OP, vq_ema_update_cpp, library=LIBRARY, kernel="vq_ema_update", on_load=_on_load,
                            checks={"cpu": _ema_check("C++ CPU kernel"), "cuda": _ema_check("CUDA kernel")})
