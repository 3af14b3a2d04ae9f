"""Triton kernels for causal linear attention (docs/ops.md §1.1), the "triton" backend.

Chunked in C = 64 tokens, three phases per direction, feature map and normalizer fused throughout:

forward   chunk_states_fwd_kernel   one program per (sequence, head, D block, Dv block) walks its chunks in
                                    order keeping S [BK × BV] and z [BK] in fp32 registers; it writes the
                                    state before every chunk (chunk_S, chunk_z: O(L/C·D·Dv)) and the final one.
          chunk_output_fwd_kernel   one program per (chunk, head, Dv block), all in parallel:
                                    o = (q̂S + tril(q̂k̂ᵀ)v) / (q̂z + rowsum(tril(q̂k̂ᵀ)) + eps), den kept.
backward  chunk_dstates_bwd_kernel  the mirror image: walks chunks in reverse carrying dS = Σ q̂ᵀ dnum and
                                    dz = Σ q̂ᵀ dden from later chunks, writes them per chunk.
          chunk_grads_bwd_kernel    one program per (chunk, head): dq, dk, dv from the chunk's own q̂, k̂, v,
                                    do and the saved states, in parallel.
The backward reads the forward's chunk states instead of recomputing them: they are O(L/C·D·Dv), the
same order as q itself at D = Dv = C, and rebuilding them would repeat the sequential sweep.
Accumulation and states are fp32 (fp64 for fp64 inputs). Dots on fp32/fp64 inputs are exact ("ieee");
on bf16 inputs q̂, k̂ stay fp32 and the dots run as tf32 (11 significant bits to bf16's 8); on fp16
inputs as tf32x3 (three tf32 products, near fp32): plain tf32 has no more bits than fp16 itself, which
puts the fp16 gradients at the edge of docs/ops.md §3's twice-the-reference limit.
D and Dv up to 128 (larger head dims fall back).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import backends
from ..common import register_autograd
from ._common import (
    CHUNK, OP, STEP_OP, acc_dtype, autograd, bwd_fake, check_step_state, chunk_rows, fwd_fake,
    last_contiguous, run_forward, step_fake,
)

MAX_HEAD_DIM = 128
MAX_HEAD_DIM_FP64_GPU = 32


@triton.jit
def _acc_scalar(x, ACC: tl.constexpr):
    # The kernels' float arguments are annotated fp64 (Triton passes a Python float as fp32 otherwise,
    # and a float64 call's eps, rounded to fp32, was its largest error): used in the accumulation dtype.
    return tl.full([], x, ACC)


@triton.jit
def _feature(x, ELU: tl.constexpr, feature_eps):
    # elu(x) + 1 + eps: exp(x) + eps for x <= 0 avoids the cancellation of (exp(x) - 1) + 1.
    if ELU:
        return tl.where(x > 0, x + 1.0 + feature_eps, tl.exp(tl.minimum(x, 0.0)) + feature_eps)
    else:
        return x


@triton.jit
def _feature_grad(x, ELU: tl.constexpr):
    if ELU:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return tl.full(x.shape, 1.0, x.dtype)


@triton.jit
def _sequence(pid_sh, cu_seqlens, H, L, NC, C: tl.constexpr, PACKED: tl.constexpr):
    """(batch row, head, first token, length, first chunk-state row) of program pid_sh = seq·H + h."""
    seq = pid_sh // H
    h = pid_sh % H
    if PACKED:
        start = tl.load(cu_seqlens + seq).to(tl.int64)
        end = tl.load(cu_seqlens + seq + 1).to(tl.int64)
        return 0, h, start, end - start, start // C + seq
    else:
        return seq, h, 0, L, seq * NC


@triton.jit
def _chunk(pid_c, cu_seqlens, chunk_seq, chunk_idx, L, NC, C: tl.constexpr, PACKED: tl.constexpr):
    """(batch row, first token, length, chunk-state row, chunk index) of chunk program pid_c."""
    if PACKED:
        seq = tl.load(chunk_seq + pid_c).to(tl.int64)
        c = tl.load(chunk_idx + pid_c).to(tl.int64)
        start = tl.load(cu_seqlens + seq).to(tl.int64)
        length = tl.load(cu_seqlens + seq + 1).to(tl.int64) - start
        return 0, start, length, start // C + seq + c, c
    else:
        return pid_c // NC, 0, L, pid_c, pid_c % NC


@triton.jit
def chunk_states_fwd_kernel(
    k, v, S0, z0, S_out, z_out, chunk_S, chunk_z, cu_seqlens,
    s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
    H, L, D, Dv, NC, feature_eps: tl.float64,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ELU: tl.constexpr,
    HAS_S0: tl.constexpr, PACKED: tl.constexpr, ACC: tl.constexpr,
):
    feature_eps = _acc_scalar(feature_eps, ACC)
    # grid (D / BK, Dv / BV, sequences · H); S [BK × BV] and z [BK] stay in registers.
    pid_k, pid_v, pid_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h, start, length, base = _sequence(pid_sh, cu_seqlens, H, L, NC, C, PACKED)
    d = pid_k * BK + tl.arange(0, BK)
    j = pid_v * BV + tl.arange(0, BV)
    md, mj = d < D, j < Dv
    state = pid_sh * D * Dv + d[:, None] * Dv + j[None, :]
    if HAS_S0:
        S = tl.load(S0 + state, mask=md[:, None] & mj[None, :], other=0.0).to(ACC)
        z = tl.load(z0 + pid_sh * D + d, mask=md, other=0.0).to(ACC)
    else:
        S = tl.zeros((BK, BV), dtype=ACC)
        z = tl.zeros((BK,), dtype=ACC)
    t = tl.arange(0, C)
    for c in range(0, tl.cdiv(length, C)):
        row = (base + c) * H + h
        tl.store(chunk_S + row * D * Dv + d[:, None] * Dv + j[None, :], S, mask=md[:, None] & mj[None, :])
        if pid_v == 0:
            tl.store(chunk_z + row * D + d, z, mask=md)
        tok = start + c * C + t
        mt = c * C + t < length
        kk = tl.load(k + b * s_kb + tok[:, None] * s_kl + h * s_kh + d[None, :], mask=mt[:, None] & md[None, :])
        kh = tl.where(mt[:, None] & md[None, :], _feature(kk.to(ACC), ELU, feature_eps), 0.0)
        vv = tl.load(v + b * s_vb + tok[:, None] * s_vl + h * s_vh + j[None, :], mask=mt[:, None] & mj[None, :],
                     other=0.0).to(ACC)
        S += tl.dot(tl.trans(kh), vv, input_precision="ieee")
        z += tl.sum(kh, 0)
    tl.store(S_out + state, S, mask=md[:, None] & mj[None, :])
    if pid_v == 0:
        tl.store(z_out + pid_sh * D + d, z, mask=md)


@triton.jit
def chunk_output_fwd_kernel(
    q, k, v, o, den, chunk_S, chunk_z, cu_seqlens, chunk_seq, chunk_idx,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
    H, L, D, Dv, NC, feature_eps: tl.float64, scale: tl.float64, eps: tl.float64,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ELU: tl.constexpr, NORMALIZE: tl.constexpr,
    PACKED: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    feature_eps, scale, eps = _acc_scalar(feature_eps, ACC), _acc_scalar(scale, ACC), _acc_scalar(eps, ACC)
    # grid (chunks, H, Dv / BV); q̂, k̂ [C × BK] (all of D), v [C × BV], scores [C × C] on chip.
    pid_c, h, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, start, length, row, c = _chunk(pid_c, cu_seqlens, chunk_seq, chunk_idx, L, NC, C, PACKED)
    row = row * H + h
    t = tl.arange(0, C)
    d = tl.arange(0, BK)
    j = pid_v * BV + tl.arange(0, BV)
    md, mj = d < D, j < Dv
    tok = start + c * C + t
    mt = c * C + t < length
    mq = mt[:, None] & md[None, :]
    qq = tl.load(q + b * s_qb + tok[:, None] * s_ql + h * s_qh + d[None, :], mask=mq, other=0.0).to(ACC)
    kk = tl.load(k + b * s_kb + tok[:, None] * s_kl + h * s_kh + d[None, :], mask=mq, other=0.0).to(ACC)
    qh = tl.where(mq, _feature(qq, ELU, feature_eps) * scale, 0.0)
    kh = tl.where(mq, _feature(kk, ELU, feature_eps), 0.0)
    vv = tl.load(v + b * s_vb + tok[:, None] * s_vl + h * s_vh + j[None, :], mask=mt[:, None] & mj[None, :],
                 other=0.0).to(ACC)
    S = tl.load(chunk_S + row * D * Dv + d[:, None] * Dv + j[None, :], mask=md[:, None] & mj[None, :], other=0.0)
    A = tl.dot(qh, tl.trans(kh), input_precision=PRECISION)
    A = tl.where(t[:, None] >= t[None, :], A, 0.0)
    num = tl.dot(qh, S, input_precision=PRECISION) + tl.dot(A, vv, input_precision=PRECISION)
    if NORMALIZE:
        z = tl.load(chunk_z + row * D + d, mask=md, other=0.0)
        dn = tl.sum(A, 1) + tl.sum(qh * z[None, :], 1) + eps
        num = num / dn[:, None]
        if pid_v == 0:
            tl.store(den + (b * H + h) * L + tok, dn, mask=mt)
    tl.store(o + b * s_ob + tok[:, None] * s_ol + h * s_oh + j[None, :], num.to(o.dtype.element_ty),
             mask=mt[:, None] & mj[None, :])


@triton.jit
def chunk_dstates_bwd_kernel(
    q, do, o, den, dS_in, dz_in, chunk_dS, chunk_dz, dS0, dz0, cu_seqlens,
    s_qb, s_ql, s_qh, s_vb, s_vl, s_vh,
    H, L, D, Dv, NC, feature_eps: tl.float64, scale: tl.float64,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr, ELU: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_DS: tl.constexpr, HAS_DZ: tl.constexpr, PACKED: tl.constexpr,
    ACC: tl.constexpr,
):
    feature_eps, scale = _acc_scalar(feature_eps, ACC), _acc_scalar(scale, ACC)
    # grid (D / BK, Dv / BV, sequences · H); dS [BK × BV], dz [BK] in registers, chunks in reverse.
    # dden = -(do·o)/den needs whole rows of do and o (BVF ≥ Dv): only the Dv block 0 carries dz.
    pid_k, pid_v, pid_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h, start, length, base = _sequence(pid_sh, cu_seqlens, H, L, NC, C, PACKED)
    d = pid_k * BK + tl.arange(0, BK)
    j = pid_v * BV + tl.arange(0, BV)
    jf = tl.arange(0, BVF)
    md, mj = d < D, j < Dv
    state = pid_sh * D * Dv + d[:, None] * Dv + j[None, :]
    if HAS_DS:
        dS = tl.load(dS_in + state, mask=md[:, None] & mj[None, :], other=0.0).to(ACC)
    else:
        dS = tl.zeros((BK, BV), dtype=ACC)
    if HAS_DZ:
        dz = tl.load(dz_in + pid_sh * D + d, mask=md, other=0.0).to(ACC)
    else:
        dz = tl.zeros((BK,), dtype=ACC)
    t = tl.arange(0, C)
    n_chunks = tl.cdiv(length, C)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        row = (base + c) * H + h
        tl.store(chunk_dS + row * D * Dv + d[:, None] * Dv + j[None, :], dS, mask=md[:, None] & mj[None, :])
        if pid_v == 0:
            tl.store(chunk_dz + row * D + d, dz, mask=md)
        tok = start + c * C + t
        mt = c * C + t < length
        mq = mt[:, None] & md[None, :]
        qq = tl.load(q + b * s_qb + tok[:, None] * s_ql + h * s_qh + d[None, :], mask=mq, other=0.0).to(ACC)
        qh = tl.where(mq, _feature(qq, ELU, feature_eps) * scale, 0.0)
        G = tl.load(do + b * s_vb + tok[:, None] * s_vl + h * s_vh + j[None, :], mask=mt[:, None] & mj[None, :],
                    other=0.0).to(ACC)
        if NORMALIZE:
            dn = tl.load(den + (b * H + h) * L + tok, mask=mt, other=1.0)
            G = G / dn[:, None]
        dS += tl.dot(tl.trans(qh), G, input_precision="ieee")
        if NORMALIZE:
            if pid_v == 0:
                mf = mt[:, None] & (jf < Dv)[None, :]
                off = b * s_vb + tok[:, None] * s_vl + h * s_vh + jf[None, :]
                dof = tl.load(do + off, mask=mf, other=0.0).to(ACC)
                of = tl.load(o + off, mask=mf, other=0.0).to(ACC)
                g = -tl.sum(dof * of, 1) / dn
                dz += tl.sum(qh * g[:, None], 0)
    tl.store(dS0 + state, dS, mask=md[:, None] & mj[None, :])
    if pid_v == 0:
        tl.store(dz0 + pid_sh * D + d, dz, mask=md)


@triton.jit
def chunk_grads_bwd_kernel(
    q, k, v, do, o, den, chunk_S, chunk_z, chunk_dS, chunk_dz, dq, dk, dv, cu_seqlens, chunk_seq, chunk_idx,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
    H, L, D, Dv, NC, feature_eps: tl.float64, scale: tl.float64,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ELU: tl.constexpr, NORMALIZE: tl.constexpr,
    PACKED: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    feature_eps, scale = _acc_scalar(feature_eps, ACC), _acc_scalar(scale, ACC)
    # grid (chunks, H); q̂, k̂ [C × BK], v, do [C × BV], scores and their gradient [C × C], the saved
    # states [BK × BV] on chip. dq, dk, dv are written contiguous [B, L, H, ·] (strides s_o*).
    pid_c, h = tl.program_id(0), tl.program_id(1)
    b, start, length, row, c = _chunk(pid_c, cu_seqlens, chunk_seq, chunk_idx, L, NC, C, PACKED)
    row = row * H + h
    t = tl.arange(0, C)
    d = tl.arange(0, BK)
    j = tl.arange(0, BV)
    md, mj = d < D, j < Dv
    tok = start + c * C + t
    mt = c * C + t < length
    mq = mt[:, None] & md[None, :]
    mv = mt[:, None] & mj[None, :]
    qq = tl.load(q + b * s_qb + tok[:, None] * s_ql + h * s_qh + d[None, :], mask=mq, other=0.0).to(ACC)
    kk = tl.load(k + b * s_kb + tok[:, None] * s_kl + h * s_kh + d[None, :], mask=mq, other=0.0).to(ACC)
    qh = tl.where(mq, _feature(qq, ELU, feature_eps) * scale, 0.0)
    kh = tl.where(mq, _feature(kk, ELU, feature_eps), 0.0)
    voff = b * s_vb + tok[:, None] * s_vl + h * s_vh + j[None, :]
    vv = tl.load(v + voff, mask=mv, other=0.0).to(ACC)
    G = tl.load(do + voff, mask=mv, other=0.0).to(ACC)
    causal = t[:, None] >= t[None, :]
    if NORMALIZE:
        dn = tl.load(den + (b * H + h) * L + tok, mask=mt, other=1.0)
        g = -tl.sum(G * tl.load(o + voff, mask=mv, other=0.0).to(ACC), 1) / dn
        G = G / dn[:, None]
        Bm = tl.where(causal, tl.dot(G, tl.trans(vv), input_precision=PRECISION) + g[:, None], 0.0)
    else:
        Bm = tl.where(causal, tl.dot(G, tl.trans(vv), input_precision=PRECISION), 0.0)
    A = tl.where(causal, tl.dot(qh, tl.trans(kh), input_precision=PRECISION), 0.0)
    soff = row * D * Dv + d[:, None] * Dv + j[None, :]
    ms = md[:, None] & mj[None, :]
    S = tl.load(chunk_S + soff, mask=ms, other=0.0)
    dqh = tl.dot(Bm, kh, input_precision=PRECISION) + tl.dot(G, tl.trans(S), input_precision=PRECISION)
    if NORMALIZE:
        z = tl.load(chunk_z + row * D + d, mask=md, other=0.0)
        dqh += g[:, None] * z[None, :]
    dS = tl.load(chunk_dS + soff, mask=ms, other=0.0)
    dz = tl.load(chunk_dz + row * D + d, mask=md, other=0.0)
    dkh = tl.dot(tl.trans(Bm), qh, input_precision=PRECISION) + tl.dot(vv, tl.trans(dS), input_precision=PRECISION)
    dkh += dz[None, :]
    dvv = tl.dot(tl.trans(A), G, input_precision=PRECISION) + tl.dot(kh, dS, input_precision=PRECISION)
    out = b * s_ob + tok[:, None] * s_ol + h * s_oh
    tl.store(dq + out + d[None, :], (dqh * scale * _feature_grad(qq, ELU)).to(dq.dtype.element_ty), mask=mq)
    tl.store(dk + out + d[None, :], (dkh * _feature_grad(kk, ELU)).to(dk.dtype.element_ty), mask=mq)
    out_v = b * (L * H * Dv) + tok[:, None] * (H * Dv) + h * Dv + j[None, :]
    tl.store(dv + out_v, dvv.to(dv.dtype.element_ty), mask=mv)


@triton.jit
def step_kernel(
    q, k, v, S, z, o, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, H, D, Dv,
    feature_eps: tl.float64, scale: tl.float64, eps: tl.float64,
    BK: tl.constexpr, BV: tl.constexpr, ELU: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
):
    feature_eps, scale, eps = _acc_scalar(feature_eps, ACC), _acc_scalar(scale, ACC), _acc_scalar(eps, ACC)
    # grid (B · H); S [BK × BV] read and written once.
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    d = tl.arange(0, BK)
    j = tl.arange(0, BV)
    md, mj = d < D, j < Dv
    qh = tl.where(md, _feature(tl.load(q + b * s_qb + h * s_qh + d, mask=md, other=0.0).to(ACC), ELU,
                               feature_eps) * scale, 0.0)
    kh = tl.where(md, _feature(tl.load(k + b * s_kb + h * s_kh + d, mask=md, other=0.0).to(ACC), ELU,
                               feature_eps), 0.0)
    vv = tl.load(v + b * s_vb + h * s_vh + j, mask=mj, other=0.0).to(ACC)
    soff = pid * D * Dv + d[:, None] * Dv + j[None, :]
    ms = md[:, None] & mj[None, :]
    St = tl.load(S + soff, mask=ms, other=0.0) + kh[:, None] * vv[None, :]
    zt = tl.load(z + pid * D + d, mask=md, other=0.0) + kh
    tl.store(S + soff, St, mask=ms)
    tl.store(z + pid * D + d, zt, mask=md)
    num = tl.sum(qh[:, None] * St, 0)
    if NORMALIZE:
        num = num / (tl.sum(qh * zt, 0) + eps)
    tl.store(o + pid * Dv + j, num.to(o.dtype.element_ty), mask=mj)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """The dots' precision for 16-bit inputs (their products are taken in fp32)."""
    return {torch.bfloat16: "tf32", torch.float16: "tf32x3"}.get(dtype, "ieee")


def _chunk_table(cu_seqlens: torch.Tensor):
    """(segment, chunk within it) of every chunk of a packed batch, for the per-chunk grids."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = (lens + CHUNK - 1) // CHUNK
    seq = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    first = torch.cumsum(counts, 0) - counts
    idx = torch.arange(seq.numel(), device=cu_seqlens.device) - first[seq]
    return seq.to(torch.int32), idx.to(torch.int32)


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


@torch.library.custom_op("agiformer_kernels::linear_attention_triton_fwd", mutates_args=())
def linear_attention_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    S0: Optional[torch.Tensor],
    z0: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, den, S_L, z_L, chunk_S [rows, H, D, Dv], chunk_z [rows, H, D])."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    packed = cu_seqlens is not None
    n = cu_seqlens.numel() - 1 if packed else B
    NC = -(-L // CHUNK)
    rows = chunk_rows(B, L, n, packed)
    sdt = acc_dtype(q.dtype)
    o = torch.empty(B, L, H, Dv, device=q.device, dtype=q.dtype)
    den = torch.empty(B, H, L, device=q.device, dtype=sdt) if normalize else q.new_empty(0, dtype=sdt)
    S = torch.empty(n, H, D, Dv, device=q.device, dtype=sdt)
    z = torch.empty(n, H, D, device=q.device, dtype=sdt)
    # Rows a short segment leaves unused are never read; zeros keep the tensor deterministic.
    chunk_S = (torch.zeros if packed else torch.empty)(rows, H, D, Dv, device=q.device, dtype=sdt)
    chunk_z = (torch.zeros if packed else torch.empty)(rows, H, D, device=q.device, dtype=sdt)
    elu = feature_map == "elu+1"
    BK, BV = min(_block(D), 64), min(_block(Dv), 64)
    chunk_states_fwd_kernel[(triton.cdiv(D, BK), triton.cdiv(Dv, BV), n * H)](
        k, v, S0, z0, S, z, chunk_S, chunk_z, cu_seqlens,
        *_strides(k), *_strides(v),
        H, L, D, Dv, NC, feature_eps,
        C=CHUNK, BK=BK, BV=BV, ELU=elu, HAS_S0=S0 is not None, PACKED=packed, ACC=_acc(q.dtype),
    )
    if packed:
        chunk_seq, chunk_idx = _chunk_table(cu_seqlens)
        n_chunks = chunk_seq.numel()
    else:
        chunk_seq = chunk_idx = None
        n_chunks = B * NC
    BV = min(_block(Dv), 64)
    if n_chunks:
        chunk_output_fwd_kernel[(n_chunks, H, triton.cdiv(Dv, BV))](
            q, k, v, o, den, chunk_S, chunk_z, cu_seqlens, chunk_seq, chunk_idx,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, L, D, Dv, NC, feature_eps, scale, eps,
            C=CHUNK, BK=_block(D), BV=BV, ELU=elu, NORMALIZE=normalize, PACKED=packed, ACC=_acc(q.dtype),
            PRECISION=_precision(q.dtype),
        )
    return o, den, S, z, chunk_S, chunk_z


linear_attention_triton_fwd.register_fake(fwd_fake(states_transposed=False))


@torch.library.custom_op("agiformer_kernels::linear_attention_triton_bwd", mutates_args=())
def linear_attention_triton_bwd(
    do: torch.Tensor,
    dS: Optional[torch.Tensor],
    dz: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    den: torch.Tensor,
    chunk_S: torch.Tensor,
    chunk_z: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dS0, dz0)."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    packed = cu_seqlens is not None
    n = cu_seqlens.numel() - 1 if packed else B
    NC = -(-L // CHUNK)
    sdt = acc_dtype(q.dtype)
    elu = feature_map == "elu+1"
    chunk_dS = torch.empty_like(chunk_S)
    chunk_dz = torch.empty_like(chunk_z)
    dS0 = torch.empty(n, H, D, Dv, device=q.device, dtype=sdt)
    dz0 = torch.empty(n, H, D, device=q.device, dtype=sdt)
    BK, BV = min(_block(D), 64), min(_block(Dv), 64)
    if do.stride() != o.stride():
        do = do.contiguous()
        o = o.contiguous()
    chunk_dstates_bwd_kernel[(triton.cdiv(D, BK), triton.cdiv(Dv, BV), n * H)](
        q, do, o, den, dS, dz, chunk_dS, chunk_dz, dS0, dz0, cu_seqlens,
        *_strides(q), *_strides(do),
        H, L, D, Dv, NC, feature_eps, scale,
        C=CHUNK, BK=BK, BV=BV, BVF=_block(Dv), ELU=elu, NORMALIZE=normalize, HAS_DS=dS is not None,
        HAS_DZ=dz is not None, PACKED=packed, ACC=_acc(q.dtype),
    )
    dq = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    dv = torch.empty(B, L, H, Dv, device=q.device, dtype=q.dtype)
    if packed:
        chunk_seq, chunk_idx = _chunk_table(cu_seqlens)
        n_chunks = chunk_seq.numel()
    else:
        chunk_seq = chunk_idx = None
        n_chunks = B * NC
    if n_chunks:
        if v.stride() != do.stride():
            v = v.contiguous()
            do = do.contiguous()
            o = o.contiguous()
        # above head dim 64 the gradient kernel's six tf32 dots staged 240-256 KiB of operands in shared memory
        # (at D = 128; sm_90 has 227, found by tests/sm90_compile.py): it takes FMA ("ieee") dots there, which fit
        chunk_grads_bwd_kernel[(n_chunks, H)](
            q, k, v, do, o, den, chunk_S, chunk_z, chunk_dS, chunk_dz, dq, dk, dv, cu_seqlens, chunk_seq, chunk_idx,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dq),
            H, L, D, Dv, NC, feature_eps, scale,
            C=CHUNK, BK=_block(D), BV=_block(Dv), ELU=elu, NORMALIZE=normalize, PACKED=packed,
            ACC=_acc(q.dtype), PRECISION=_precision(q.dtype) if max(D, Dv) <= 64 else "ieee",
        )
    return dq, dk, dv, dS0, dz0


linear_attention_triton_bwd.register_fake(bwd_fake)
register_autograd(linear_attention_triton_fwd, autograd(linear_attention_triton_bwd))


@torch.library.custom_op("agiformer_kernels::linear_attention_triton_step", mutates_args=("S", "z"))
def linear_attention_triton_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    S: torch.Tensor,
    z: torch.Tensor,
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
) -> torch.Tensor:
    B, H, D = q.shape
    Dv = v.shape[-1]
    o = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    step_kernel[(B * H,)](
        q, k, v, S, z, o, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, D, Dv, feature_eps, scale, eps,
        BK=_block(D), BV=_block(Dv), ELU=feature_map == "elu+1", NORMALIZE=normalize, ACC=_acc(q.dtype),
    )
    return o


linear_attention_triton_step.register_fake(step_fake)


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options):
    return run_forward(linear_attention_triton_fwd, q, k, v, **options)


def linear_attention_step_triton(q, k, v, state, *, feature_map, feature_eps, scale, eps,
                                 normalize) -> torch.Tensor:
    S, z = state
    return linear_attention_triton_step(
        last_contiguous(q), last_contiguous(k), last_contiguous(v), S, z,
        feature_map, feature_eps, scale, eps, normalize,
    )


def _check(q, k, v, *args, **kwargs) -> Optional[str]:
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got D = {D}, Dv = {Dv}"
    if q.dtype == torch.float64 and q.is_cuda and max(D, Dv) > MAX_HEAD_DIM_FP64_GPU:
        # fp64 dots stage their operands in shared memory: the backward's nine [64 x 64] fp64 products need
        # 264 KiB, more than an sm_90 block may have (227 KiB)
        return (f"in float64 on a GPU the Triton kernels take head dims up to {MAX_HEAD_DIM_FP64_GPU} (shared "
                f"memory), got D = {D}, Dv = {Dv}")
    return None


def _check_step(q, k, v, state, **kwargs) -> Optional[str]:
    return check_step_state(q, k, v, state) or _check(q, k, v)


backends.register(OP, "triton", linear_attention_triton, check=_check, available=backends.triton_unavailable)
backends.register(STEP_OP, "triton", linear_attention_step_triton, check=_check_step,
                  available=backends.triton_unavailable)
