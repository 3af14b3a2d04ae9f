"""Triton GRU patch decoder: recurrence kernels (forward, backward, sampling) and a fused head + cross-entropy.

The launchers do the two products that need no recurrence with one GEMM each, as the op's structure
allows: the byte table E·W_ih[:, :h]ᵀ (256×3h) and gc = c·W_ih[:, h:]ᵀ + b_ih (M×3h). The kernels then
run all P steps of a tile of BLOCK_M patches:

- ``gru_fwd_kernel``: grid (cdiv(M, BLOCK_M),). Per step and per block of BLOCK_N hidden units: gather
  the table rows of the step's bytes, add gc, the three W_hh products over K blocks (h_{t-1} read back
  from the hidden output, which the step wrote: L2-resident), gates fused, h_t and [r, z, n, W_hn·h + b_hn]
  stored. A barrier per step makes h_t visible to the whole program.
- ``gru_bwd_kernel``: same grid, the steps in reverse: gate gradients dgi = dL/d(W_ih·x), dgh =
  dL/d(W_hh·h) stored per step, dL/dh_{t-1} = dh·z + dgh·W_hh + upstream kept in a [M, h] scratch row.
  Weight gradients are then GEMMs over those stored gate gradients (and one index_add for the table), W_hh's
  over all steps in one batched GEMM (the gradients are stored step-major). For bf16 inputs those GEMMs run on
  tensor cores: dgh is stored as bf16 hi | lo (16 significant bits; hi is what the kernel's own dgh·W_hh takes)
  and the small dgc = Σ_t dgi is split the same way.
- ``gru_sample_kernel``: the fwd step, then logits = h·W_headᵀ + b (BLOCK_M×256 on chip), the byte
  chosen in-kernel (argmax, or inverse CDF of softmax(logits/T) restricted to the top_k with the
  counter-based hash of reference.counter_uniform), and fed back as the next step's gather index.
- ``ce_fwd_kernel`` / ``ce_bwd_dh_kernel`` / ``ce_bwd_dw_kernel``: head + cross-entropy over the M·P
  hidden rows without materialising logits: the forward keeps a BLOCK_R×256 logits tile on chip and
  writes the log-sum-exp; the backward recomputes tiles from it (row-parallel for dL/dh, vocabulary-block
  × row-split parallel for the head's weight gradient, reduced over splits afterwards).

Accumulation is fp32 (fp64 for fp64 inputs); fp32 products use IEEE precision (not tf32). On CPU tensors
the kernels run through the Triton interpreter (tests only).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ... import backends
from ..common import register_autograd
from ._common import (
    DECODE_OP, LOSS_OP, SAMPLE_OP, VOCAB, acc_dtype, decode_autograd, decode_bwd_fake, decode_fwd_fake, draw_seed,
    loss_autograd, loss_bwd_fake, loss_fwd_fake, reduce, sample_fake, teacher_inputs, wants_grad,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HIDDEN = 1024  # the head's weight-gradient kernel holds a BLOCK_V × h tile
MAX_HIDDEN_FP64_LOSS_GPU = 512


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter with bf16/fp16 only: its dot multiplies the raw 16-bit storage)
    takes the product in fp32, exact for 16-bit operands."""
    if UPCAST:  # if/else: Triton compiles past a return in a static if (see _order_key)
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return out


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 1 - 2 / (1 + e^{2x}) saturates to ±1 without inf/inf
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))


@triton.jit
def _argmax_rows(logits, vocab, V: tl.constexpr):
    """(logit, index) of each row's torch.argmax pick: the first maximum, and a NaN is the maximum (the first
    NaN). From min/max reductions: tl.argmax leaves NaNs to its reduction order, and a custom combine runs
    ~100x slower in the interpreter."""
    nan = logits != logits
    first_nan = tl.min(tl.where(nan, vocab, V), 1)
    mx = tl.max(tl.where(nan, float("-inf"), logits), 1)
    first_max = tl.min(tl.where(logits == mx[:, None], vocab, V), 1)
    has_nan = first_nan < V
    return tl.where(has_nan, float("nan"), mx), tl.where(has_nan, first_nan, first_max)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _order_key(x):
    """Integers ordered as the floats x: the sign-magnitude bits with the magnitude flipped below zero."""
    # if/else, not an early return: the compiler goes on past a return in a static if, and compiled the fp32
    # bitcast for fp64 too (Triton 3.6 for sm_90: "Cannot bitcast data-type of size 64 to data-type of size 32")
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    else:
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return key


@triton.jit
def _kth_key(logits, k):
    """Per row, the order key of the k-th largest logit: the largest key v with #{key >= v} >= k, found by
    bisection over the integers (a sort of each 256-wide row costs far more, in the interpreter above all)."""
    key = _order_key(logits)
    lo = tl.min(key, 1)
    hi = tl.max(key, 1)
    for _ in range(0, 65 if logits.dtype == tl.float64 else 33):  # the interval halves each round
        # hi - lo may pass 2^63 for float64 keys: the unsigned difference is exact
        half = ((hi.to(tl.uint64, bitcast=True) - lo.to(tl.uint64, bitcast=True) + 1) >> 1).to(tl.int64)
        mid = lo + half
        enough = tl.sum((key >= mid[:, None]).to(tl.int32), 1) >= k
        active = lo < hi
        lo, hi = tl.where(active & enough, mid, lo), tl.where(active & ~enough, mid - 1, hi)
    return lo


@triton.jit
def _gru_units(gc_ptr, table_ptr, b, w_hh_ptr, b_hh_ptr, hprev_ptr, stride_hprev, rows, row_ok, cols, col_ok, t, H,
               ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One step for hidden units `cols` of rows `rows`: returns (r, z, n, hn, h_new), [BLOCK_M, BLOCK_N] each.
    h_{t-1} is read from hprev_ptr (row stride stride_hprev); t == 0 means h_{t-1} = 0."""
    G = 3 * H
    mask = row_ok[:, None] & col_ok[None, :]
    hr = tl.zeros([BLOCK_M, BLOCK_N], ACC) + tl.load(b_hh_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    hz = tl.zeros([BLOCK_M, BLOCK_N], ACC) + tl.load(b_hh_ptr + H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    hn = tl.zeros([BLOCK_M, BLOCK_N], ACC) + tl.load(b_hh_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    hp = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if t > 0:
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            hk = tl.load(hprev_ptr + rows[:, None] * stride_hprev + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            w = w_hh_ptr + cols[None, :] * H + ks[:, None]  # [BLOCK_K, BLOCK_N] view of W_hhᵀ
            wmask = k_ok[:, None] & col_ok[None, :]
            w_r = tl.load(w, mask=wmask, other=0.0)
            hk = hk.to(w_r.dtype)
            hr = _dot(hk, w_r, hr, PRECISION, UPCAST)
            hz = _dot(hk, tl.load(w + H * H, mask=wmask, other=0.0), hz, PRECISION, UPCAST)
            hn = _dot(hk, tl.load(w + 2 * H * H, mask=wmask, other=0.0), hn, PRECISION, UPCAST)
        hp = tl.load(hprev_ptr + rows[:, None] * stride_hprev + cols[None, :], mask=mask, other=0.0)
    # the input parts after the products: not live across their loop (register pressure)
    gc = gc_ptr + rows[:, None] * G + cols[None, :]
    tb = table_ptr + b[:, None] * G + cols[None, :]
    a_r = tl.load(gc, mask=mask, other=0.0) + tl.load(tb, mask=mask, other=0.0)
    a_z = tl.load(gc + H, mask=mask, other=0.0) + tl.load(tb + H, mask=mask, other=0.0)
    i_n = tl.load(gc + 2 * H, mask=mask, other=0.0) + tl.load(tb + 2 * H, mask=mask, other=0.0)
    r = _sigmoid(a_r + hr)
    z = _sigmoid(a_z + hz)
    n = _tanh(i_n + r * hn)
    return r, z, n, hn, n + z * (hp - n)


@triton.jit
def gru_fwd_kernel(gc_ptr, table_ptr, bytes_ptr, w_hh_ptr, b_hh_ptr, hid_ptr, out_ptr, gates_ptr, M, P, H,
                   SAVE: tl.constexpr, CAST_OUT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """hid [M, P, H] (acc dtype) ← h_1..h_P; out: the same in the input dtype when CAST_OUT; gates [M, P, 4H]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    for t in range(0, P):
        b = tl.load(bytes_ptr + rows * P + t, mask=row_ok, other=0)
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            r, z, n, hn, h_new = _gru_units(gc_ptr, table_ptr, b, w_hh_ptr, b_hh_ptr, hid_ptr + (t - 1) * H, P * H,
                                            rows, row_ok, cols, col_ok, t, H, ACC, BLOCK_M, BLOCK_N, BLOCK_K,
                                            PRECISION, UPCAST)
            mask = row_ok[:, None] & col_ok[None, :]
            at = (rows[:, None] * P + t) * H + cols[None, :]
            tl.store(hid_ptr + at, h_new, mask=mask)
            if CAST_OUT:
                tl.store(out_ptr + at, h_new.to(out_ptr.dtype.element_ty), mask=mask)
            if SAVE:
                g = gates_ptr + (rows[:, None] * P + t) * 4 * H + cols[None, :]
                tl.store(g, r, mask=mask)
                tl.store(g + H, z, mask=mask)
                tl.store(g + 2 * H, n, mask=mask)
                tl.store(g + 3 * H, hn, mask=mask)
        tl.debug_barrier()


@triton.jit
def _store_split(ptr, lo_offset, x, mask, SPLIT: tl.constexpr):
    """x at ptr; with SPLIT, as hi + lo in ptr's 16-bit dtype, lo at ptr + lo_offset."""
    if SPLIT:
        hi = x.to(ptr.dtype.element_ty)
        tl.store(ptr, hi, mask=mask)
        tl.store(ptr + lo_offset, (x - hi.to(x.dtype)).to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def gru_bwd_kernel(dH_ptr, hid_ptr, gates_ptr, w_hh_ptr, dgi_ptr, dgh_ptr, dh_ptr, dd_ptr, M, P, H,
                   SPLIT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dgi [P, M, 3H], dgh [P, M, 3H] (with SPLIT [P, M, 6H]: hi | lo) ← gate gradients from dH = dL/dhidden
    [M, P, H] (any float dtype); dh, dd: [M, H] scratch (dL/dh_t and its direct part dh·z). Step-major: W_hh's
    gradient takes all steps in one batched GEMM."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    G = 3 * H
    GH = 2 * G if SPLIT else G  # a row of dgh
    for s in range(0, P):
        t = P - 1 - s
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < H)[None, :]
            unit = rows[:, None] * H + cols[None, :]
            if s == 0:
                dh = tl.load(dH_ptr + (rows[:, None] * P + t) * H + cols[None, :], mask=mask, other=0.0).to(ACC)
            else:
                dh = tl.load(dh_ptr + unit, mask=mask, other=0.0)
            g = gates_ptr + (rows[:, None] * P + t) * 4 * H + cols[None, :]
            r = tl.load(g, mask=mask, other=0.0)
            z = tl.load(g + H, mask=mask, other=0.0)
            n = tl.load(g + 2 * H, mask=mask, other=0.0)
            hn = tl.load(g + 3 * H, mask=mask, other=0.0)
            hp = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            if t > 0:
                hp = tl.load(hid_ptr + (rows[:, None] * P + t - 1) * H + cols[None, :], mask=mask, other=0.0)
            step_row = t * M + rows[:, None]
            at = step_row * G + cols[None, :]
            ah = step_row * GH + cols[None, :]
            # each gate's two gradients stored as soon as they are formed (fewer tiles live at once)
            tl.store(dd_ptr + unit, dh * z, mask=mask)
            daz = dh * (hp - n) * z * (1.0 - z)
            tl.store(dgi_ptr + at + H, daz, mask=mask)
            _store_split(dgh_ptr + ah + H, G, daz, mask, SPLIT)
            dan = dh * (1.0 - z) * (1.0 - n * n)
            tl.store(dgi_ptr + at + 2 * H, dan, mask=mask)
            _store_split(dgh_ptr + ah + 2 * H, G, dan * r, mask, SPLIT)
            dar = dan * hn * r * (1.0 - r)
            tl.store(dgi_ptr + at, dar, mask=mask)
            _store_split(dgh_ptr + ah, G, dar, mask, SPLIT)
        tl.debug_barrier()
        if t > 0:
            # dL/dh_{t-1} = dh·z + dgh_t·W_hh + upstream at t-1
            for n0 in range(0, H, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                unit = rows[:, None] * H + cols[None, :]
                acc = tl.load(dd_ptr + unit, mask=mask, other=0.0) + tl.load(
                    dH_ptr + (rows[:, None] * P + t - 1) * H + cols[None, :], mask=mask, other=0.0).to(ACC)
                for k0 in range(0, G, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < G
                    w = tl.load(w_hh_ptr + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                                other=0.0)
                    d = tl.load(dgh_ptr + (t * M + rows[:, None]) * GH + ks[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    acc = _dot(d.to(w.dtype), w, acc, PRECISION, UPCAST)
                tl.store(dh_ptr + unit, acc, mask=mask)
            tl.debug_barrier()


@triton.jit
def _head_logits(h_ptr, stride_h, rows, row_ok, hw_ptr, hb_ptr, H, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_R, V] logits = h[rows]·W_headᵀ + b_head."""
    vs = tl.arange(0, V)
    acc = tl.zeros([BLOCK_R, V], ACC) + tl.load(hb_ptr + vs).to(ACC)[None, :]
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        w = tl.load(hw_ptr + vs[None, :] * H + ks[:, None], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, V]
        hk = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(hk.to(w.dtype), w, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def gru_sample_kernel(gc_ptr, table_ptr, w_hh_ptr, b_hh_ptr, hw_ptr, hb_ptr, prefix_ptr, seed_ptr, out_ptr, h_ptr,
                      M, P, H, forced, sos, inv_temp: tl.float64, top_k, GREEDY: tl.constexpr, TOP_K: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      V: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out [M, P] int64 ← bytes; h: [2, M, H] scratch (h_t ping-pongs so a step reads h_{t-1} whole)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = tl.zeros([BLOCK_M], tl.int64) + sos
    if not GREEDY:
        s0 = tl.load(seed_ptr).to(tl.uint32)
        s1 = tl.load(seed_ptr + 1).to(tl.uint32)
        row_hash = _mix32(_mix32(s0 ^ rows.to(tl.uint32)) ^ s1)
    for t in range(0, P):
        h_prev = h_ptr + (t % 2) * M * H
        h_next = h_ptr + ((t + 1) % 2) * M * H
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            _, _, _, _, h_new = _gru_units(gc_ptr, table_ptr, b, w_hh_ptr, b_hh_ptr, h_prev, H, rows, row_ok, cols,
                                           col_ok, t, H, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
            tl.store(h_next + rows[:, None] * H + cols[None, :], h_new, mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()
        if t < forced:
            b = tl.load(prefix_ptr + rows * forced + t, mask=row_ok, other=0).to(tl.int64)
        else:
            logits = _head_logits(h_next, H, rows, row_ok, hw_ptr, hb_ptr, H, ACC, BLOCK_M, BLOCK_K, V, PRECISION,
                                  UPCAST)
            vocab = tl.broadcast_to(tl.arange(0, V)[None, :], logits.shape)
            best_logit, best = _argmax_rows(logits, vocab, V)
            best = best.to(tl.int64)
            if GREEDY:
                b = best
            else:
                if TOP_K:
                    logits = tl.where(_order_key(logits) >= _kth_key(logits, top_k)[:, None], logits, float("-inf"))
                # inv_temp arrives in fp64 (annotated: Triton passes a Python float as fp32), used in ACC
                c = tl.cumsum(tl.exp((logits - best_logit[:, None]) * tl.full([], inv_temp, ACC)), 1)
                u = (_mix32(row_hash ^ t) >> 8).to(ACC) * (1.0 / 16777216.0)
                target = u * tl.max(c, 1)
                # the first byte whose running sum passes the target; none (rounding, or NaN sums from a NaN or
                # infinite logit): the argmax
                chosen = tl.min(tl.where(c > target[:, None], vocab, V), 1).to(tl.int64)
                b = tl.where(chosen < V, chosen, best)
            b = tl.where(row_ok, b, 0)
        tl.store(out_ptr + rows * P + t, b, mask=row_ok)


@triton.jit
def ce_fwd_kernel(h_ptr, hw_ptr, hb_ptr, y_ptr, loss_ptr, lse_ptr, R, H, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """loss, lse [R] ← cross-entropy of h [R, H] through the head; the logits tile never leaves the chip."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    logits = _head_logits(h_ptr, H, rows, row_ok, hw_ptr, hb_ptr, H, ACC, BLOCK_R, BLOCK_K, V, PRECISION, UPCAST)
    mx = tl.max(logits, 1)
    lse = mx + tl.log(tl.sum(tl.exp(logits - mx[:, None]), 1))
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    picked = tl.sum(tl.where(tl.arange(0, V)[None, :] == y[:, None], logits, 0.0), 1)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - picked, mask=row_ok)


@triton.jit
def _softmax_grad(logits, lse, g, y, V: tl.constexpr):
    """g·(softmax - onehot(y)) from logits [R, V], lse [R], g [R], y [R]."""
    p = tl.exp(logits - lse[:, None])
    return g[:, None] * (p - (tl.arange(0, V)[None, :] == y[:, None]).to(p.dtype))


@triton.jit
def ce_bwd_dh_kernel(h_ptr, hw_ptr, hb_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, R, H, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, V: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dh [R, H] ← dL/dh = g·(softmax - onehot)·W_head, the logits recomputed from the saved lse."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    vs = tl.arange(0, V)
    logits = _head_logits(h_ptr, H, rows, row_ok, hw_ptr, hb_ptr, H, ACC, BLOCK_R, BLOCK_K, V, PRECISION, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    dl = _softmax_grad(logits, lse, g, y, V)
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        w = tl.load(hw_ptr + vs[:, None] * H + cols[None, :], mask=col_ok[None, :], other=0.0)  # [V, BLOCK_N]
        acc = _dot(dl.to(w.dtype), w, tl.zeros([BLOCK_R, BLOCK_N], ACC), PRECISION, UPCAST)
        tl.store(dh_ptr + rows[:, None] * H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def ce_bwd_dw_kernel(h_ptr, hw_ptr, hb_ptr, y_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr, R, H, rows_per_split,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """grid (256 / BLOCK_V, splits): dw [splits, 256, H], db [splits, 256] ← the head's gradient over the
    split's rows, for the program's vocabulary block (its logits columns recomputed from the saved lse)."""
    vb = tl.program_id(0)
    split = tl.program_id(1)
    vs = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = tl.arange(0, BLOCK_H)
    h_ok = hs < H
    w = tl.load(hw_ptr + vs[None, :] * H + hs[:, None], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, BLOCK_V]
    bias = tl.load(hb_ptr + vs).to(ACC)
    dw = tl.zeros([BLOCK_V, BLOCK_H], ACC)
    db = tl.zeros([BLOCK_V], ACC)
    r_lo = split * rows_per_split
    for r0 in range(r_lo, r_lo + rows_per_split, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        hrow = tl.load(h_ptr + rows[:, None] * H + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        hrow = hrow.to(w.dtype)
        logits = _dot(hrow, w, tl.zeros([BLOCK_R, BLOCK_V], ACC), PRECISION, UPCAST) + bias[None, :]
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # 0 on padding rows: they add nothing
        y = tl.load(y_ptr + rows, mask=row_ok, other=0)
        p = tl.exp(logits - lse[:, None])
        dl = g[:, None] * (p - (vs[None, :] == y[:, None]).to(p.dtype))
        db += tl.sum(dl, 0)
        dw = _dot(tl.trans(dl).to(w.dtype), hrow, dw, PRECISION, UPCAST)
    tl.store(dw_ptr + split * 256 * H + vs[:, None] * H + hs[None, :], dw, mask=h_ok[None, :])
    tl.store(db_ptr + split * 256 + vs, db)


# ---------------------------------------------------------------------------------------------
# Launchers


# The GPU launch of each recurrence kernel ("fwd", "bwd", "sample"): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages); 3 stages is Triton's default on sm_90. ``gpu_config`` swaps one in for a block of calls.
GPU_CONFIGS = {"fwd": (32, 64, 64, 4, 3), "bwd": (32, 64, 64, 4, 3), "sample": (32, 64, 64, 4, 3)}


@contextlib.contextmanager
def gpu_config(kernel: str, config: tuple[int, int, int, int, int]):
    """Launch ``kernel``'s recurrence kernel on a GPU with ``config`` (see GPU_CONFIGS) inside the block: what
    ``benchmarks/tune_gru.py`` times against the default."""
    if kernel not in GPU_CONFIGS:
        raise ValueError(f"kernel must be one of {sorted(GPU_CONFIGS)}, got {kernel!r}")
    if len(config) != 5 or not all(isinstance(c, int) and c >= 1 for c in config):
        raise ValueError(f"config must be 5 positive ints (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), "
                         f"got {config!r}")
    default = GPU_CONFIGS[kernel]
    GPU_CONFIGS[kernel] = tuple(config)
    try:
        yield
    finally:
        GPU_CONFIGS[kernel] = default


class _Config:
    """Block sizes, warps and dot flags of one call. The interpreter runs programs one after another, so it
    gets the widest blocks (fewest programs and loop trips); a GPU gets register-sized ones from GPU_CONFIGS."""

    def __init__(self, h: int, dtype: torch.dtype, device: torch.device, kernel: str = "fwd"):
        width = max(16, triton.next_power_of_2(h))
        gpu = device.type == "cuda"
        block_m, block_n, block_k, self.num_warps, self.num_stages = (
            GPU_CONFIGS[kernel] if gpu else (256, 256, 256, 4, 1))
        if gpu and dtype == torch.float64:
            # the head's fp64 weight tiles, [BLOCK_K, 256] double-buffered and [256, BLOCK_N], take 288 and 324 KiB
            # of shared memory at 64 (sm_90 has 227, checked by tests/sm90_compile.py): 32 fits
            block_n, block_k = min(block_n, 32), min(block_k, 32)
        self.block_m = block_m
        self.block_n = min(width, block_n)
        self.block_k = min(width, block_k)
        # the head's weight-gradient kernel holds [BLOCK_R, h] and [h, BLOCK_V] tiles: from 4 KiB rows on (fp32
        # h = 1024, fp64 h = 512) 32 of each take 265-400 KiB of shared memory on sm_90 (227 there), 16 fit
        narrow_head = width * (8 if dtype == torch.float64 else 4) >= 4096
        self.block_r = (16 if narrow_head else 32) if gpu else 512  # rows of the head kernels
        self.block_v = (16 if narrow_head else 32) if gpu else VOCAB
        self.block_h = width
        self.acc = tl.float64 if dtype == torch.float64 else tl.float32
        self.precision = "ieee"  # fp32 products stay fp32 (tf32 would cost ~1e-3 relative)
        self.upcast = INTERPRET and dtype in (torch.float16, torch.bfloat16)

    def dots(self) -> dict:
        return dict(ACC=self.acc, PRECISION=self.precision, UPCAST=self.upcast)

    def recurrence(self) -> dict:
        """The launch arguments of a recurrence kernel: its blocks, warps, stages and dot flags."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, num_warps=self.num_warps,
                    num_stages=self.num_stages, **self.dots())


def _mm(a, b):
    """a @ b, in fp32 for 16-bit operands: their products are exact in fp32 and summed there, on tensor cores on a
    GPU (cuBLAS with an fp32 output; on CPU, where mm has no out_dtype, the interpreter tests' upcast stand-in).
    fp32 and fp64 operands: an ordinary GEMM in their dtype."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.float() @ b.float()


def _input_parts(context, byte_emb, weight_ih, bias_ih, table=None):
    """The byte table [256, 3h] (unless given) and gc = c·W_ih[:, h:]ᵀ + b_ih [M, 3h], in the accumulation dtype:
    one GEMM each."""
    a = acc_dtype(context.dtype)
    h = context.shape[1]
    table = (_mm(byte_emb, weight_ih[:, :h].T) if table is None else table).to(a).contiguous()
    gc = _mm(context, weight_ih[:, h:].T).add_(bias_ih)
    return table, gc


def _recurrence_fwd(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save, cast_out):
    """(hidden in the accumulation dtype, hidden in the input dtype or None, gates or an empty [0, P, 4h])."""
    (M, h), P = context.shape, prev_bytes.shape[1]
    a = acc_dtype(context.dtype)
    cfg = _Config(h, context.dtype, context.device)
    table, gc = _input_parts(context, byte_emb, weight_ih, bias_ih)
    hid = torch.empty(M, P, h, dtype=a, device=context.device)
    out = torch.empty(M, P, h, dtype=context.dtype, device=context.device) if cast_out else None
    gates = torch.empty(M if save else 0, P, 4 * h, dtype=a, device=context.device)
    if M > 0:
        gru_fwd_kernel[(triton.cdiv(M, cfg.block_m),)](
            gc, table, prev_bytes.contiguous(), weight_hh.contiguous(), bias_hh.contiguous(), hid,
            hid if out is None else out, gates if save else hid, M, P, h, SAVE=save, CAST_OUT=cast_out,
            **cfg.recurrence())
    return hid, out, gates


def _split(x, dtype):
    """fp32 x as the pair hi + lo in dtype (bf16): 16 significant bits, and x's exponent range."""
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


def _bmm(a, b):
    """The batched _mm."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b)
    return torch.bmm(a, b, out_dtype=torch.float32) if a.is_cuda else torch.bmm(a.float(), b.float())


def _recurrence_bwd(grad_hidden, context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden, gates):
    """The six GRU gradients, in the input dtype, from dL/dhidden [M, P, h].

    bf16 inputs: the fp32 gradient operand of each weight-gradient GEMM is split into bf16 hi + lo and the other
    operand is bf16 (the inputs; h_{t-1} rounded to bf16, as bf16 training holds it), so the GEMMs run on tensor
    cores with fp32 sums, at twice the products, instead of on fp32 cores. The kernel stores dgh split (hi | lo
    side by side in a row). Storing dgh in bf16 alone would double these gradients' error (it failed the docs/ops.md §3
    rule at M 1000)."""
    (M, h), P = context.shape, prev_bytes.shape[1]
    dtype, a = context.dtype, acc_dtype(context.dtype)
    cfg = _Config(h, dtype, context.device, "bwd")
    split = dtype == torch.bfloat16  # fp16's exponent range would flush a small lo (and hi) to zero
    op = dtype if split else a  # the GEMMs' operand dtype
    dgi = torch.empty(P, M, 3 * h, dtype=a, device=context.device)
    dgh = torch.empty(P, M, (2 if split else 1) * 3 * h, dtype=op, device=context.device)
    if M > 0:
        scratch = torch.empty(2, M, h, dtype=a, device=context.device)
        gru_bwd_kernel[(triton.cdiv(M, cfg.block_m),)](
            grad_hidden.contiguous(), hidden, gates, weight_hh.contiguous(), dgi, dgh, scratch[0], scratch[1], M, P, h,
            SPLIT=split, **cfg.recurrence())
    # weight gradients: GEMMs over the stored gate gradients
    dgc = dgi.sum(0)
    dgc_parts = _split(dgc, dtype) if split else (dgc,)
    w_c, ctx = weight_ih[:, h:].to(op), context.to(op)
    dctx = sum(_mm(part, w_c) for part in dgc_parts)
    dw_c = sum(_mm(part.T, ctx) for part in dgc_parts)
    dw_hh = torch.zeros(3 * h, h, dtype=a, device=context.device)
    if P > 1:  # Σ_{t≥1} dgh_tᵀ·h_{t-1}: the steps in one batched GEMM (hi, lo rows stacked in its output), summed
        dw_hh = _bmm(dgh[1:].transpose(1, 2), hidden[:, :-1].to(op).transpose(0, 1)).sum(0).view(-1, 3 * h, h).sum(0)
    dtable = torch.zeros(VOCAB, 3 * h, dtype=a, device=context.device)
    dtable.index_add_(0, prev_bytes.T.reshape(-1).long(), dgi.view(-1, 3 * h))
    dw_e = dtable.T @ byte_emb.to(a)
    demb = dtable @ weight_ih[:, :h].to(a)
    db_hh = dgh.sum((0, 1), dtype=a).view(-1, 3 * h).sum(0)
    grads = (dctx, demb, torch.cat([dw_e, dw_c], 1), dw_hh, dgc.sum(0), db_hh)
    return tuple(g.to(dtype) for g in grads)


@torch.library.custom_op("agiformer_kernels::gru_patch_triton_decode_fwd", mutates_args=())
def decode_fwd(context: torch.Tensor, prev_bytes: torch.Tensor, byte_emb: torch.Tensor, weight_ih: torch.Tensor,
               weight_hh: torch.Tensor, bias_ih: torch.Tensor, bias_hh: torch.Tensor,
               save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cast_out = context.dtype != acc_dtype(context.dtype)
    hid, out, gates = _recurrence_fwd(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save,
                                      cast_out)
    if not cast_out:
        return hid, gates, hid.new_empty(0)
    return out, gates, hid if save else hid.new_empty(0)


decode_fwd.register_fake(decode_fwd_fake)


@torch.library.custom_op("agiformer_kernels::gru_patch_triton_decode_bwd", mutates_args=())
def decode_bwd(grad_hidden: torch.Tensor, context: torch.Tensor, prev_bytes: torch.Tensor, byte_emb: torch.Tensor,
               weight_ih: torch.Tensor, weight_hh: torch.Tensor, hidden: torch.Tensor,
               gates: torch.Tensor) -> list[torch.Tensor]:
    return list(_recurrence_bwd(grad_hidden, context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden, gates))


decode_bwd.register_fake(decode_bwd_fake)
register_autograd(decode_fwd, decode_autograd(decode_bwd))


@torch.library.custom_op("agiformer_kernels::gru_patch_triton_loss_fwd", mutates_args=())
def loss_fwd(context: torch.Tensor, targets: torch.Tensor, byte_emb: torch.Tensor, weight_ih: torch.Tensor,
             weight_hh: torch.Tensor, bias_ih: torch.Tensor, bias_hh: torch.Tensor, head_weight: torch.Tensor,
             head_bias: torch.Tensor, sos: int, save: bool,
             head_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    """The loss; the head's backward is left to ``loss_bwd`` (``head_grad`` is ignored: empty head outputs)."""
    (M, h), P = context.shape, targets.shape[1]
    cfg = _Config(h, context.dtype, context.device)
    prev = teacher_inputs(targets, sos).contiguous()
    hid, _, gates = _recurrence_fwd(context, prev, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save, False)
    R = M * P
    loss = torch.empty(M, P, dtype=hid.dtype, device=hid.device)
    lse = torch.empty_like(loss)
    if R > 0:
        ce_fwd_kernel[(triton.cdiv(R, cfg.block_r),)](
            hid, head_weight.contiguous(), head_bias.contiguous(), targets.contiguous(), loss, lse, R, h,
            BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, V=VOCAB, **cfg.dots())
    kept = hid if save else hid.new_empty(0, P, h)
    return loss, lse, kept, gates, hid.new_empty(0, P, h), hid.new_empty(0), hid.new_empty(0)


loss_fwd.register_fake(loss_fwd_fake(early_head_grad=False))


@torch.library.custom_op("agiformer_kernels::gru_patch_triton_loss_bwd", mutates_args=())
def loss_bwd(grad_loss: torch.Tensor, context: torch.Tensor, targets: torch.Tensor, byte_emb: torch.Tensor,
             weight_ih: torch.Tensor, weight_hh: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
             hidden: torch.Tensor, gates: torch.Tensor, lse: torch.Tensor, sos: int) -> list[torch.Tensor]:
    (M, h), P = context.shape, targets.shape[1]
    dtype, a = context.dtype, acc_dtype(context.dtype)
    cfg = _Config(h, dtype, context.device)
    R = M * P
    g = grad_loss.to(a).contiguous()
    hw, hb, y = head_weight.contiguous(), head_bias.contiguous(), targets.contiguous()
    dH = torch.empty(M, P, h, dtype=a, device=context.device)
    blocks = triton.cdiv(R, cfg.block_r)
    splits = max(1, min(blocks, 64))
    rows_per_split = triton.cdiv(blocks, splits) * cfg.block_r
    dw = torch.empty(splits, VOCAB, h, dtype=a, device=context.device)
    db = torch.empty(splits, VOCAB, dtype=a, device=context.device)
    if R > 0:
        ce_bwd_dh_kernel[(blocks,)](hidden, hw, hb, y, lse, g, dH, R, h, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n,
                                    BLOCK_K=cfg.block_k, V=VOCAB, **cfg.dots())
        ce_bwd_dw_kernel[(VOCAB // cfg.block_v, splits)](hidden, hw, hb, y, lse, g, dw, db, R, h, rows_per_split,
                                                          BLOCK_R=cfg.block_r, BLOCK_V=cfg.block_v,
                                                          BLOCK_H=cfg.block_h, **cfg.dots())
    else:
        dw.zero_()
        db.zero_()
    prev = teacher_inputs(targets, sos).contiguous()
    grads = _recurrence_bwd(dH, context, prev, byte_emb, weight_ih, weight_hh, hidden, gates)
    return [*grads, dw.sum(0).to(dtype), db.sum(0).to(dtype)]


loss_bwd.register_fake(loss_bwd_fake)
register_autograd(loss_fwd, loss_autograd(loss_bwd, decode_bwd))


@torch.library.custom_op("agiformer_kernels::gru_patch_triton_sample", mutates_args=())
def sample_op(context: torch.Tensor, byte_emb: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
              bias_ih: torch.Tensor, bias_hh: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
              patch_size: int, temperature: float, top_k: int, prefix: torch.Tensor | None,
              sos: int, seed: torch.Tensor | None, byte_table: torch.Tensor | None) -> torch.Tensor:
    M, h = context.shape
    cfg = _Config(h, context.dtype, context.device, "sample")
    out = torch.empty(M, patch_size, dtype=torch.int64, device=context.device)
    if M == 0:
        return out
    table, gc = _input_parts(context, byte_emb, weight_ih, bias_ih, byte_table)
    scratch = torch.empty(2, M, h, dtype=table.dtype, device=context.device)
    forced = 0 if prefix is None else prefix.shape[1]
    pre = out if forced == 0 else prefix.to(torch.int64).contiguous()
    greedy = temperature == 0
    gru_sample_kernel[(triton.cdiv(M, cfg.block_m),)](
        gc, table, weight_hh.contiguous(), bias_hh.contiguous(), head_weight.contiguous(), head_bias.contiguous(),
        pre, out if greedy else seed, out, scratch, M, patch_size, h, forced, sos,
        0.0 if greedy else 1.0 / temperature, top_k, GREEDY=greedy, TOP_K=0 < top_k < VOCAB, V=VOCAB,
        **cfg.recurrence())
    return out


sample_op.register_fake(sample_fake)


# ---------------------------------------------------------------------------------------------
# Backend functions


def gru_patch_decode_triton(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh):
    save = wants_grad(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    hidden, _, _ = decode_fwd(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save)
    return hidden


def gru_patch_loss_triton(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias,
                          *, sos, reduction):
    save = wants_grad(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias)
    loss = loss_fwd(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, sos,
                    save, False)[0]
    return reduce(loss, reduction)


@torch.no_grad()
def gru_patch_sample_triton(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *,
                            patch_size, temperature, top_k, prefix, sos, generator, byte_table):
    seed = draw_seed(generator, context.device) if temperature > 0 else None
    if prefix is not None and prefix.shape[1] == 0:
        prefix = None
    return sample_op(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, patch_size,
                     temperature, top_k or 0, prefix, sos, seed, byte_table)


def _check(context, *args, **kwargs):
    if context.shape[1] > MAX_HIDDEN:
        return f"hidden size {context.shape[1]} > {MAX_HIDDEN}"
    return None


def _check_loss(context, *args, **kwargs):
    if context.dtype == torch.float64 and context.is_cuda and context.shape[1] > MAX_HIDDEN_FP64_LOSS_GPU:
        # the head's weight-gradient tiles at 16 rows still need 396 KiB of shared memory at h = 1024 on sm_90
        return (f"in float64 on a GPU the Triton loss takes hidden sizes up to {MAX_HIDDEN_FP64_LOSS_GPU} "
                f"(shared memory), got {context.shape[1]}")
    return _check(context)


backends.register(DECODE_OP, "triton", gru_patch_decode_triton, check=_check, available=backends.triton_unavailable)
backends.register(LOSS_OP, "triton", gru_patch_loss_triton, check=_check_loss, available=backends.triton_unavailable)
backends.register(SAMPLE_OP, "triton", gru_patch_sample_triton, check=_check, available=backends.triton_unavailable)
