"""Triton sliding-window attention: flash-style forward, backward (dk/dv and dq kernels) and decode step.

Query i sees keys j with max(i - window + 1, seg_start[i]) <= j <= i. Each program walks only the
key blocks (forward, dq) or query blocks (dk/dv) its window reaches, clamped on both sides, so work
per block is O(window + block). Blocks split three ways: a lower-edge stretch and a diagonal
stretch with element masks, and between them the interior, where every pair is visible and no mask
is built. Scores live in log2 units (scale folded with log2 e) so the softmax uses exp2; the
forward saves lse2 = m + log2(l) per query, from which the backward recomputes P.

On CPU tensors the kernels run through the Triton interpreter (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from ..common import register_autograd
from ._common import (
    OP, STEP_OP, autograd, bwd_fake, check_step_caches, fwd_fake, segment_bounds, step_fake, step_positions,
)

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
BLOCK_M = 64  # queries per program (forward, dq) and per step of the dk/dv loop
BLOCK_N = 64  # keys per program (dk/dv) and per step of the forward / dq loop
STEP_BLOCK = 64  # ring slots per step of the decode kernel


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b, fp32 accumulation. UPCAST (interpreter with bf16 only: its dot multiplies bf16's raw
    uint16 storage) takes the product in fp32, which is exact for bf16 operands."""
    if UPCAST:  # if/else: Triton compiles past a return in a static if (gru_patch's _order_key)
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _edges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [lo, hi) into masked [start, b1), unmasked [b1, b2), masked [b2, hi) in BLOCK-aligned
    steps, where [full_lo, full_hi) is the stretch visible to the whole tile."""
    start = (lo // BLOCK) * BLOCK
    b1 = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK) * BLOCK, start), hi)
    b2 = tl.minimum(tl.maximum((full_hi // BLOCK) * BLOCK, b1), hi)
    return start, b1, b2


@triton.jit
def _visible(offs_m, offs_n, seg_m, window):
    """[M, N]: query offs_m sees key offs_n (causal, within window, same sequence)."""
    return (
        (offs_n[None, :] <= offs_m[:, None])
        & (offs_n[None, :] > offs_m[:, None] - window)
        & (offs_n[None, :] >= seg_m[:, None])
    )


@triton.jit
def _tile(base, rows, row_ok, stride_row, width, BLOCK: tl.constexpr):
    """The [rows, BLOCK] tile at base + row·stride_row + column, zero past ``width`` columns and where not row_ok."""
    cols = tl.arange(0, BLOCK)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < width),
                   other=0.0)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, n_lo, n_hi, L, window,
               scale_log2, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < L
        k = _tile(k_ptrs, offs_n, key_ok, stride_kl, D, BLOCK_D)
        v = _tile(v_ptrs, offs_n, key_ok, stride_vl, DV, BLOCK_DV)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
        if MASK:
            s = tl.where(_visible(offs_m, offs_n, seg_m, window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def window_fwd_kernel(
    Q, K, V, O, LSE, SEG_START,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
    L, H, window, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M), B*H). On chip: the Q tile [BLOCK_M, BLOCK_D], the fp32 accumulator
    [BLOCK_M, BLOCK_DV], running max and sum; K/V tiles [BLOCK_N, *] stream through."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _tile(Q + b * stride_qb + h * stride_qh, offs_m, row_ok, stride_ql, D, BLOCK_D)
    seg_m = tl.load(SEG_START + offs_m, mask=row_ok, other=0)
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    lo = tl.maximum(m0 - window + 1, tl.load(SEG_START + m0))
    full_lo = tl.maximum(m_last - window + 1, tl.load(SEG_START + m_last))
    start, b1, b2 = _edges(lo, m_last + 1, full_lo, m0 + 1, BLOCK_N)

    k_ptrs = K + b * stride_kb + h * stride_kh
    v_ptrs = V + b * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, start, b1, L,
                               window, scale_log2, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, PRECISION, UPCAST)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, b1, b2, L,
                               window, scale_log2, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, PRECISION, UPCAST)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, b2, m_last + 1,
                               L, window, scale_log2, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, PRECISION, UPCAST)
    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * L + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, n_lo, n_hi, L, window,
                  scale_log2, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < L
        k = _tile(k_ptrs, offs_n, key_ok, stride_kl, D, BLOCK_D)
        v = _tile(v_ptrs, offs_n, key_ok, stride_vl, DV, BLOCK_DV)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(_visible(offs_m, offs_n, seg_m, window), p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    return dq


@triton.jit
def window_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEG_START,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    L, H, window, scale, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M), B*H), the forward's walk over keys. On chip: Q, dO tiles, lse and
    delta of the block, and the fp32 dQ accumulator [BLOCK_M, BLOCK_D]."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q = _tile(Q + b * stride_qb + h * stride_qh, offs_m, row_ok, stride_ql, D, BLOCK_D)
    do = _tile(DO + b * stride_dob + h * stride_doh, offs_m, row_ok, stride_dol, DV, BLOCK_DV)
    lse = tl.load(LSE + bh * L + offs_m, mask=row_ok, other=float("inf"))  # padding rows: p = 0
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
    seg_m = tl.load(SEG_START + offs_m, mask=row_ok, other=0)
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    lo = tl.maximum(m0 - window + 1, tl.load(SEG_START + m0))
    full_lo = tl.maximum(m_last - window + 1, tl.load(SEG_START + m_last))
    start, b1, b2 = _edges(lo, m_last + 1, full_lo, m0 + 1, BLOCK_N)

    k_ptrs = K + b * stride_kb + h * stride_kh
    v_ptrs = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, start, b1, L,
                       window, scale_log2, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, PRECISION, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, b1, b2, L,
                       window, scale_log2, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, PRECISION, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_m, seg_m, b2, m_last + 1, L,
                       window, scale_log2, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, PRECISION, UPCAST)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_ql, stride_dol, LSE, DELTA, SEG_START, offs_n, m_lo, m_hi,
                    L, window, scale_log2, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    for m in range(m_lo, m_hi, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = _tile(q_ptrs, offs_m, row_ok, stride_ql, D, BLOCK_D)
        do = _tile(do_ptrs, offs_m, row_ok, stride_dol, DV, BLOCK_DV)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        # transposed tiles [BLOCK_N keys, BLOCK_M queries]: dK and dV are sums over the queries
        st = _dot(k, tl.trans(q), PRECISION, UPCAST) * scale_log2
        pt = tl.math.exp2(st - lse[None, :])
        if MASK:
            seg_m = tl.load(SEG_START + offs_m, mask=row_ok, other=0)
            pt = tl.where(tl.trans(_visible(offs_m, offs_n, seg_m, window)), pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def window_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, SEG_START, SEG_END,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh, stride_dvb, stride_dvl, stride_dvh,
    L, H, window, scale, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_N), B*H): one key block, walking the query blocks that see it
    (i in [n0, n_last + window), same sequence). On chip: K, V tiles and fp32 dK, dV accumulators."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < L
    k = _tile(K + b * stride_kb + h * stride_kh, offs_n, key_ok, stride_kl, D, BLOCK_D)
    v = _tile(V + b * stride_vb + h * stride_vh, offs_n, key_ok, stride_vl, DV, BLOCK_DV)
    n_last = tl.minimum(n0 + BLOCK_N, L) - 1
    hi = tl.minimum(tl.minimum(n_last + window, tl.load(SEG_END + n_last)), L)
    full_hi = tl.minimum(n0 + window, tl.load(SEG_END + n0))
    start, b1, b2 = _edges(n0, hi, n_last, full_hi, BLOCK_M)

    q_ptrs = Q + b * stride_qb + h * stride_qh
    do_ptrs = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lse_ptr = LSE + bh * L
    delta_ptr = DELTA + bh * L
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_ql, stride_dol, lse_ptr, delta_ptr, SEG_START,
                             offs_n, start, b1, L, window, scale_log2, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, True,
                             PRECISION, UPCAST)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_ql, stride_dol, lse_ptr, delta_ptr, SEG_START,
                             offs_n, b1, b2, L, window, scale_log2, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, False,
                             PRECISION, UPCAST)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_ql, stride_dol, lse_ptr, delta_ptr, SEG_START,
                             offs_n, b2, hi, L, window, scale_log2, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, True,
                             PRECISION, UPCAST)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :]
    dv_ptrs = DV_ + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_dv[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=key_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def window_step_kernel(
    Q, K, V, KC, VC, POS, O,
    H, W, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (B*H,). Caches [B, W, H, *] contiguous; q, k, v, o [B, H, *] contiguous. The new key
    enters the softmax from registers and its ring slot is skipped in the sweep over the cache, so
    the kernel never reads back what it writes."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tl.load(POS + b)
    slot = pos % W
    n_valid = tl.minimum(pos + 1, W)
    q = tl.load(Q + bh * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    k_new = tl.load(K + bh * D + offs_d, mask=offs_d < D, other=0.0)
    v_new = tl.load(V + bh * DV + offs_dv, mask=offs_dv < DV, other=0.0)
    tl.store(KC + ((b * W + slot) * H + h) * D + offs_d, k_new, mask=offs_d < D)
    tl.store(VC + ((b * W + slot) * H + h) * DV + offs_dv, v_new, mask=offs_dv < DV)
    m_i = tl.sum(q * k_new.to(tl.float32), 0) * scale_log2
    l_i = 1.0
    acc = v_new.to(tl.float32)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        ok = (offs_w < n_valid) & (offs_w != slot)
        rows = (b * W + offs_w) * H + h
        k = _tile(KC, rows, ok, D, D, BLOCK_D)
        v = _tile(VC, rows, ok, DV, DV, BLOCK_DV)
        s = tl.where(ok, tl.sum(q[None, :] * k.to(tl.float32), 1) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    tl.store(O + bh * DV + offs_dv, (acc / l_i).to(O.dtype.element_ty), mask=offs_dv < DV)


# ---------------------------------------------------------------------------------------------
# Launchers and custom ops
# ---------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride but need a contiguous last dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _meta(q: torch.Tensor, v: torch.Tensor) -> dict:
    D, Dv = q.shape[-1], v.shape[-1]
    return dict(
        D=D, DV=Dv, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        # fp32 inputs get full-precision products (docs/ops.md §3: 1e-5); 16-bit inputs use the tensor cores as is
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
    )


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


@torch.library.custom_op("agiformer_kernels::sliding_window_attention_triton_fwd", mutates_args=())
def window_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor, window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, L, H, _ = q.shape
    o = torch.empty(B, L, H, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(L, BLOCK_M), B * H)
    window_fwd_kernel[grid](
        q, k, v, o, lse, seg_start, *_strides(q, k, v, o), L, H, window, scale * LOG2E,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **_meta(q, v),
    )
    return o, lse


window_fwd.register_fake(fwd_fake)


@torch.library.custom_op("agiformer_kernels::sliding_window_attention_triton_bwd", mutates_args=())
def window_bwd(
    grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    seg_start: torch.Tensor, seg_end: torch.Tensor, window: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, grad_o = _rows(q), _rows(k), _rows(v), _rows(grad_o)
    B, L, H, _ = q.shape
    # delta_i = rowsum(dO_i ∘ O_i) = sum_j P_ij dP_ij, [B, H, L] fp32
    delta = (grad_o.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _meta(q, v)
    window_bwd_dq_kernel[(triton.cdiv(L, BLOCK_M), B * H)](
        q, k, v, grad_o, lse, delta, dq, seg_start, *_strides(q, k, v, grad_o, dq), L, H, window, scale,
        scale * LOG2E, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta,
    )
    window_bwd_dkdv_kernel[(triton.cdiv(L, BLOCK_N), B * H)](
        q, k, v, grad_o, lse, delta, dk, dv, seg_start, seg_end, *_strides(q, k, v, grad_o, dk, dv), L, H, window,
        scale, scale * LOG2E, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta,
    )
    return dq, dk, dv


window_bwd.register_fake(bwd_fake)
register_autograd(window_fwd, autograd(window_bwd))


@torch.library.custom_op("agiformer_kernels::sliding_window_attention_triton_step", mutates_args=("k_cache", "v_cache"))
def window_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    pos: torch.Tensor, scale: float,
) -> torch.Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, D = q.shape
    Dv, W = v.shape[-1], k_cache.shape[1]
    o = torch.empty(B, H, Dv, dtype=q.dtype, device=q.device)
    window_step_kernel[(B * H,)](
        q, k, v, k_cache, v_cache, pos, o, H, W, scale * LOG2E, D=D, DV=Dv, BLOCK_W=STEP_BLOCK,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
    )
    return o


window_step.register_fake(step_fake)


# ---------------------------------------------------------------------------------------------
# Backend entry points
# ---------------------------------------------------------------------------------------------


def sliding_window_attention_triton(q, k, v, window, *, scale, cu_seqlens=None):
    seg_start, seg_end = segment_bounds(cu_seqlens, q.shape[1], q.device)
    o, _ = window_fwd(q, k, v, seg_start, seg_end, min(window, q.shape[1]), scale)
    return o


def sliding_window_attention_step_triton(q, k, v, k_cache, v_cache, pos, *, scale):
    return window_step(q, k, v, k_cache, v_cache, step_positions(pos, q.shape[0], q.device).contiguous(), scale)


def _check(q, k, v, *args, **options) -> backends.Reason:
    if q.dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


def _check_step(q, k, v, k_cache, v_cache, pos, **options) -> backends.Reason:
    return _check(q, k, v) or check_step_caches(q, k, v, k_cache, v_cache, pos)


backends.register(OP, "triton", sliding_window_attention_triton, check=_check, available=backends.triton_unavailable)
backends.register(
    STEP_OP, "triton", sliding_window_attention_step_triton, check=_check_step, available=backends.triton_unavailable
)
