"""Triton next-byte entropy: one program per block of positions, the vocabulary in tiles with an online
log-sum-exp, so no [B, L, V] softmax exists. The boundaries (O(B·L)) come from ``_common.boundaries``.

On CPU tensors the kernel runs through the Triton interpreter (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from ._common import OP, boundaries, kernel_options, sequence_start

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_R = 16  # positions per program
MAX_BLOCK_V = 1024  # vocabulary tile


@triton.jit
def entropy_fwd_kernel(X, H, R, V, stride_r, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (cdiv(R, BLOCK_R),), R = B·L rows of V logits (last dim contiguous). On chip per row: the running
    max m, Z = sum e^(x - m) and A = sum e^(x - m)(x - m); H = log Z - A / Z. A logit of -inf adds nothing."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    z = tl.zeros([BLOCK_R], dtype=tl.float32)
    a = tl.zeros([BLOCK_R], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < V)
        x = tl.load(X + rows[:, None] * stride_r + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        finite = x > float("-inf")
        d = tl.where(finite, x - m_safe[:, None], 0.0)  # masked logits: d = 0, e = 0 (no 0·inf)
        e = tl.where(finite, tl.exp(d), 0.0)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)  # old terms move from base m to m_new
        alpha = tl.exp(shift)
        a = alpha * (a + z * shift) + tl.sum(e * d, 1)
        z = alpha * z + tl.sum(e, 1)
        m = m_new
    z_safe = tl.where(row_ok, z, 1.0)
    tl.store(H + rows, tl.log(z_safe) - a / z_safe, mask=row_ok)


@torch.library.custom_op("agiformer_kernels::entropy_triton_fwd", mutates_args=())
def entropy_fwd(logits: torch.Tensor) -> torch.Tensor:
    B, L, V = logits.shape
    x = logits.reshape(B * L, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    h = torch.empty(B * L, dtype=torch.float32, device=logits.device)
    if B * L > 0:
        entropy_fwd_kernel[(triton.cdiv(B * L, BLOCK_R),)](
            x, h, B * L, V, x.stride(0), BLOCK_R=BLOCK_R,
            BLOCK_V=min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V))))
    return h.view(B, L)


@entropy_fwd.register_fake
def _(logits):
    return logits.new_empty(logits.shape[:2], dtype=torch.float32)


def entropy_segments_triton(logits, *, rule, threshold, delta=None, max_len=None, cu_seqlens=None):
    entropy = entropy_fwd(logits)
    seq_start = sequence_start(cu_seqlens, logits.shape[1], logits.device)
    return entropy, boundaries(entropy, seq_start, *kernel_options(rule, threshold, delta, max_len))


def _check(logits, **options) -> backends.Reason:
    if logits.dtype not in DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, got {logits.dtype}"
    return None


backends.register(OP, "triton", entropy_segments_triton, check=_check, available=backends.triton_unavailable)
