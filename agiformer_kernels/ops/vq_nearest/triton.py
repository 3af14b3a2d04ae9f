"""Triton nearest-code search: one program per BLOCK_N vectors walks the codebook in tiles of BLOCK_K codes,
ranking them by |c|^2 - 2 z·c from tensor-core dots over D in chunks, with a running minimum (strictly smaller
scores replace it, so ties keep the lowest index, as torch.argmin). No [N, K] matrix exists. The chosen code's
distance is then recomputed exactly (``_common.exact_sqdist``, O(N·D)).

On CPU tensors the kernel runs through the Triton interpreter (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from ._common import OP, exact_sqdist, fwd_fake

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def vq_nearest_kernel(Z, C, CN, IDX, N, K, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N),). Z [N, D], C [K, D] contiguous, CN [K] fp32 = |c|^2. On chip: the fp32 dot tile
    [BLOCK_N, BLOCK_K] and the running best score and index per vector; z and code chunks [*, BLOCK_D] stream."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        dots = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            z = tl.load(Z + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            c = tl.load(C + codes[:, None] * D + cols[None, :], mask=code_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # interpreter with bf16: its dot multiplies bf16's raw storage
                dots += tl.dot(z.to(tl.float32), tl.trans(c.to(tl.float32)))
            else:
                dots += tl.dot(z, tl.trans(c), input_precision=PRECISION)
        cn = tl.load(CN + codes, mask=code_ok, other=float("inf"))
        score = cn[None, :] - 2.0 * dots
        score = tl.where(code_ok[None, :], score, float("inf"))
        tile_min = tl.min(score, 1)
        tile_i = tl.argmin(score, 1).to(tl.int32) + k0  # the first of equal minima
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_i = tl.where(better, tile_i, best_i)
    tl.store(IDX + rows, best_i.to(tl.int64), mask=row_ok)


@torch.library.custom_op("agiformer_kernels::vq_nearest_triton_fwd", mutates_args=())
def nearest_fwd(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = z.shape
    K = codebook.shape[0]
    z, codebook = z.contiguous(), codebook.contiguous()
    index = torch.zeros(N, dtype=torch.int64, device=z.device)
    c_norm = codebook.float().square().sum(-1).contiguous()
    if N > 0:
        vq_nearest_kernel[(triton.cdiv(N, BLOCK_N),)](
            z, codebook, c_norm, index, N, K, D, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            BLOCK_D=min(64, max(16, triton.next_power_of_2(D))),
            # fp32 inputs rank with full-precision products: tf32 would reorder near codes
            PRECISION="ieee" if z.dtype == torch.float32 else "tf32",
            UPCAST=z.device.type == "cpu" and z.dtype == torch.bfloat16)
    return index, exact_sqdist(z, codebook, index)


nearest_fwd.register_fake(fwd_fake)


def vq_nearest_triton(z, codebook):
    return nearest_fwd(z, codebook)


def _check(z, codebook) -> backends.Reason:
    if z.dtype not in DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, got {z.dtype}"
    return None


backends.register(OP, "triton", vq_nearest_triton, check=_check, available=backends.triton_unavailable)
