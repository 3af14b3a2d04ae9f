"""Fused kernels for the AGIFORMER byte-level language model.

The AGIFORMER ops (linear attention, sliding-window attention, the GRU patch decoder) and the ops of
entropy-patched byte models (entropy segmentation, segment pooling, nearest-code quantisation), each with a
pure-PyTorch reference, a C++ CPU, a Triton and a CUDA backend (``backend=`` argument or
``AGIFORMER_KERNELS_BACKEND``; see ``available_backends()``). The contract: docs/ops.md.
"""

from .backends import BackendError, available_backends
from .cards import algorithm
from .ops.entropy_segments import entropy_segments, segment_offsets
from .ops.gru_patch import gru_patch_byte_table, gru_patch_decode, gru_patch_loss, gru_patch_sample
from .ops.linear_attention import linear_attention, linear_attention_step
from .ops.segment_pool import segment_pool
from .ops.sliding_window_attention import sliding_window_attention, sliding_window_attention_step
from .ops.vq_nearest import vq_ema_update, vq_nearest

__all__ = [
    "BackendError",
    "algorithm",
    "available_backends",
    "entropy_segments",
    "gru_patch_byte_table",
    "gru_patch_decode",
    "gru_patch_loss",
    "gru_patch_sample",
    "linear_attention",
    "linear_attention_step",
    "segment_offsets",
    "segment_pool",
    "sliding_window_attention",
    "sliding_window_attention_step",
    "vq_ema_update",
    "vq_nearest",
]
