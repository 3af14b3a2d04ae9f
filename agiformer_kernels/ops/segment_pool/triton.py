"""Triton segment pooling: forward and backward.

Forward: one program per (segment, head) walks its positions in blocks of BLOCK_T with an online softmax
(scores in log2 units, exp2). The Q queries are few (1 to 4 in the models), so products are broadcast sums on
[BLOCK_Q, BLOCK_T, D] tiles rather than tensor-core dots. Backward: one program per (SEGS consecutive segments,
head) writes the dk, dv rows of its segments (each position belongs to one segment) and sums its share of
d_queries in registers; the per-program shares are added afterwards.

On CPU tensors the kernels run through the Triton interpreter (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from ..common import register_autograd
from ._common import OP, autograd, bwd_fake, fwd_fake

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
MAX_QUERIES = 16
BLOCK_T = 16  # positions per step
SEGS = 16  # segments per backward program


@triton.jit
def _rows(base, rows, row_ok, stride, width, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < width),
                   other=0.0).to(tl.float32)


@triton.jit
def segment_pool_fwd_kernel(
    Qs, K, V, OFF, O, LSE, H, Q, D, DV, stride_kt, stride_vt, scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (S, H). On chip: the queries [BLOCK_Q, BLOCK_D], the fp32 accumulator [BLOCK_Q, BLOCK_DV], running
    max and sum; k, v rows [BLOCK_T, *] stream through. Qs [Q, H, D], O [S, Q, H, DV], LSE [S, Q, H] contiguous."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(OFF + s)
    t1 = tl.load(OFF + s + 1)
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Q
    q = _rows(Qs + h * D, offs_q, q_ok, H * D, D, BLOCK_D) * scale_log2
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
    for t in range(t0, t1, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t1
        k = _rows(K + h * D, offs_t, t_ok, stride_kt, D, BLOCK_D)
        v = _rows(V + h * DV, offs_t, t_ok, stride_vt, DV, BLOCK_DV)
        sc = tl.sum(q[:, None, :] * k[None, :, :], 2)
        sc = tl.where(t_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        p = tl.math.exp2(sc - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        m = m_new
    offs_dv = tl.arange(0, BLOCK_DV)
    o_rows = (s * Q + offs_q) * H + h
    tl.store(O + o_rows[:, None] * DV + offs_dv[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
             mask=q_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + o_rows, (m + tl.math.log2(l)) / 1.4426950408889634, mask=q_ok)


@triton.jit
def segment_pool_bwd_kernel(
    Qs, K, V, OFF, DO, O, LSE, DQP, DK, DV_, S, H, Q, D, DV, stride_kt, stride_vt, scale_log2,
    SEGS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (cdiv(S, SEGS), H). On chip: the queries, and the program's d_queries share [BLOCK_Q, BLOCK_D]; per
    segment dO, delta = rowsum(dO·O) and lse; k, v rows stream through and their dk, dv rows are written once.
    DQP [programs, Q, H, D] fp32 receives the shares (times scale, added up by the launcher)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qs = _rows(Qs + h * D, offs_q, q_ok, H * D, D, BLOCK_D)  # scale·queries
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for i in range(SEGS):
        s = pid * SEGS + i
        s_ok = s < S
        sc_ = tl.minimum(s, S - 1)
        t0 = tl.load(OFF + sc_)
        t1 = tl.where(s_ok, tl.load(OFF + sc_ + 1), t0)  # a program past the last segment walks nothing
        o_rows = (sc_ * Q + offs_q) * H + h
        do = _rows(DO, o_rows, q_ok, DV, DV, BLOCK_DV)
        o = _rows(O, o_rows, q_ok, DV, DV, BLOCK_DV)
        delta = tl.sum(do * o, 1)
        lse2 = tl.load(LSE + o_rows, mask=q_ok, other=float("inf")) * 1.4426950408889634
        for t in range(t0, t1, BLOCK_T):
            offs_t = t + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t1
            k = _rows(K + h * D, offs_t, t_ok, stride_kt, D, BLOCK_D)
            v = _rows(V + h * DV, offs_t, t_ok, stride_vt, DV, BLOCK_DV)
            sc = tl.sum(qs[:, None, :] * k[None, :, :], 2) * 1.4426950408889634
            p = tl.where(t_ok[None, :] & q_ok[:, None], tl.math.exp2(sc - lse2[:, None]), 0.0)  # [BQ, BT]
            dp = tl.sum(do[:, None, :] * v[None, :, :], 2)
            ds = p * (dp - delta[:, None])
            dv = tl.sum(p[:, :, None] * do[:, None, :], 0)  # [BT, BDV]
            dk = tl.sum(ds[:, :, None] * qs[:, None, :], 0)  # [BT, BD]
            dq += tl.sum(ds[:, :, None] * k[None, :, :], 1)
            tl.store(DK + offs_t[:, None] * stride_kt + h * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                     mask=t_ok[:, None] & (offs_d[None, :] < D))
            tl.store(DV_ + offs_t[:, None] * stride_vt + h * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                     mask=t_ok[:, None] & (offs_dv[None, :] < DV))
    dq_rows = (pid * Q + offs_q) * H + h
    tl.store(DQP + dq_rows[:, None] * D + offs_d[None, :], dq, mask=q_ok[:, None] & (offs_d[None, :] < D))


def _meta(queries: torch.Tensor, v: torch.Tensor) -> dict:
    Q, _, D = queries.shape
    return dict(BLOCK_Q=max(2, triton.next_power_of_2(Q)), BLOCK_T=BLOCK_T, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])))


@torch.library.custom_op("agiformer_kernels::segment_pool_triton_fwd", mutates_args=())
def pool_fwd(queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    Q, H, D = queries.shape
    k, v = k.contiguous(), v.contiguous()
    S, Dv = offsets.shape[0] - 1, v.shape[-1]
    out = torch.empty(S, Q, H, Dv, dtype=queries.dtype, device=k.device)
    lse = torch.empty(S, Q, H, dtype=torch.float32, device=k.device)
    segment_pool_fwd_kernel[(S, H)](queries.contiguous(), k, v, offsets, out, lse, H, Q, D, Dv, k.stride(0),
                                    v.stride(0), scale * LOG2E, **_meta(queries, v))
    return out, lse


pool_fwd.register_fake(fwd_fake)


@torch.library.custom_op("agiformer_kernels::segment_pool_triton_bwd", mutates_args=())
def pool_bwd(grad_out: torch.Tensor, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Q, H, D = queries.shape
    k, v = k.contiguous(), v.contiguous()
    S, Dv = offsets.shape[0] - 1, v.shape[-1]
    programs = triton.cdiv(S, SEGS)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_parts = torch.empty(programs, Q, H, D, dtype=torch.float32, device=k.device)
    qs = (queries.float() * scale).contiguous()
    segment_pool_bwd_kernel[(programs, H)](
        qs, k, v, offsets, grad_out.contiguous(), out.contiguous(), lse.contiguous(), dq_parts, dk, dv, S, H, Q, D,
        Dv, k.stride(0), v.stride(0), scale * LOG2E, SEGS=SEGS, **_meta(queries, v))
    dq = (dq_parts.sum(0) * scale).to(queries.dtype)
    return dq, dk, dv


pool_bwd.register_fake(bwd_fake)
register_autograd(pool_fwd, autograd(pool_bwd))


def segment_pool_triton(queries, k, v, offsets, *, scale):
    out, _ = pool_fwd(queries, k, v, offsets, scale)
    return out


def _check(queries, k, v, offsets, **options) -> backends.Reason:
    if queries.dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {queries.dtype}"
    if max(queries.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got D={queries.shape[-1]}, Dv={v.shape[-1]}"
    if queries.shape[0] > MAX_QUERIES:
        return f"the Triton kernels take up to {MAX_QUERIES} queries, got Q={queries.shape[0]}"
    return None


backends.register(OP, "triton", segment_pool_triton, check=_check, available=backends.triton_unavailable)
