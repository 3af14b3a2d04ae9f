"""Fused kernels for the AGIFORMER byte-level language model.

Three ops, each with a pure-PyTorch reference, a C++ CPU, a Triton and a CUDA backend
(``backend=`` argument or ``AGIFORMER_KERNELS_BACKEND``; see ``available_backends()``).
"""

from .backends import BackendError, available_backends
from .ops.gru_patch import gru_patch_byte_table, gru_patch_decode, gru_patch_loss, gru_patch_sample
from .ops.linear_attention import linear_attention, linear_attention_step
from .ops.sliding_window_attention import sliding_window_attention, sliding_window_attention_step

__all__ = [
    "BackendError",
    "available_backends",
    "gru_patch_byte_table",
    "gru_patch_decode",
    "gru_patch_loss",
    "gru_patch_sample",
    "linear_attention",
    "linear_attention_step",
    "sliding_window_attention",
    "sliding_window_attention_step",
]
