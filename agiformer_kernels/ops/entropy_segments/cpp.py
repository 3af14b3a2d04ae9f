"""The C++ extension's entropy segmentation (csrc/entropy_segments/): the "cpu" and "cuda"
backends.

``torch.ops.agiformer_kernels.entropy_segments_fwd`` follows the contract in ``_common``; its fake kernel is
attached when the library loads.
"""

from __future__ import annotations

import torch

from ... import backends
from ._common import LIBRARY, OP, fwd_fake, kernel_options, sequence_start

FWD = "agiformer_kernels::entropy_segments_fwd"
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _on_load() -> None:
    torch.library.register_fake(FWD, fwd_fake)


def entropy_segments_cpp(logits, *, rule, threshold, delta=None, max_len=None, cu_seqlens=None):
    seq_start = sequence_start(cu_seqlens, logits.shape[1], logits.device)
    return torch.ops.agiformer_kernels.entropy_segments_fwd(
        logits, seq_start, *kernel_options(rule, threshold, delta, max_len))


def _check_cpu(logits, **options) -> backends.Reason:
    if logits.dtype not in CPU_DTYPES:
        return f"the C++ CPU kernel takes float32 or float64, got {logits.dtype}"
    return None


def _check_cuda(logits, **options) -> backends.Reason:
    if logits.dtype not in CUDA_DTYPES:
        return f"the CUDA kernels take float16, bfloat16 or float32, got {logits.dtype}"
    return None


backends.register_extension(OP, entropy_segments_cpp, library=LIBRARY, kernel="entropy_segments_fwd",
                            on_load=_on_load, checks={"cpu": _check_cpu, "cuda": _check_cuda})
