"""The CUDA kernels of gru_patch (csrc/gru_patch/gru_patch.cu), run on the CPU.

The source runs under the emulated CUDA runtime of tests/cuda_emulation.py (what that checks and what it
cannot, the real __expf/__logf among them, is said there): the recurrence kernels (forward with saved
gates, backward to the gate gradients), the head kernels (cross-entropy forward, dL/dh and the split
head-weight gradient) and the sampling kernel (warp argmax, top-k bisection, warp prefix sum, counter
RNG) meet the float64 oracle. The host launch functions are called directly; what the torch binding
(gru_patch_cuda.cpp) does around them with cuBLAS (byte table, context GEMM, weight gradients from
the gate gradients) is done here with the same torch ops on the CPU. The real thing runs in the
gpu-marked tests of test_gru_patch.py.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from agiformer_kernels.ops.gru_patch import reference as R
from tests.cuda_emulation import CSRC, for_gcc, load, ptr
from tests.ops.test_gru_patch import (
    DECODE_NAMES,
    FLOAT_NAMES,
    decode_args,
    decode_oracle,
    loss_args,
    loss_oracle,
    make_inputs,
    run_with_grads,
    sample_args,
    shape_id,
    upstream,
)
from tests.utils import assert_close, assert_low_precision_close

SOURCE = CSRC / "gru_patch" / "gru_patch.cu"

ENTRY_POINTS = r"""
#include "kernels.cu"
using namespace agf_gru;
extern "C" {
int emu_gru_fwd(int dt, const void* gc, const void* table, const int64_t* bytes, const void* w_hh_t, const void* b_hh,
                void* hid, void* out, void* gates, int64_t M, int P, int H) {
  return gru_fwd(FwdParams{gc, table, bytes, w_hh_t, b_hh, hid, out, gates, M, P, H}, DType(dt), nullptr);
}
int emu_gru_bwd(int dt, const void* dH, const void* hid, const void* gates, const void* w_hh, void* dgi, void* dgh,
                int64_t M, int P, int H) {
  return gru_bwd(BwdParams{dH, hid, gates, w_hh, dgi, dgh, M, P, H}, DType(dt), nullptr);
}
int emu_gru_sample(int dt, const void* gc, const void* table, const void* w_hh_t, const void* b_hh, const void* head_t,
                   const void* head_b, const int64_t* prefix, const int64_t* seed, int64_t* out, int64_t M, int P,
                   int H, int forced, int sos, int top_k, int greedy, double inv_temperature) {
  SampleParams p{gc, table, w_hh_t, b_hh, head_t, head_b, prefix, seed, out, M, P, H, forced, sos, top_k, greedy != 0,
                 inv_temperature};
  return gru_sample(p, DType(dt), nullptr);
}
static CeParams ce(const void* h, const void* head_w, const void* head_t, const void* head_b, const int64_t* y,
                   void* lse, int64_t R, int H) {
  CeParams p{};
  p.h = h;
  p.head_w = head_w;
  p.head_t = head_t;
  p.head_b = head_b;
  p.y = y;
  p.lse = lse;
  p.R = R;
  p.H = H;
  return p;
}
int emu_ce_fwd(int dt, const void* h, const void* head_t, const void* head_b, const int64_t* y, void* lse, void* loss,
               int64_t R, int H) {
  CeParams p = ce(h, nullptr, head_t, head_b, y, lse, R, H);
  p.loss = loss;
  return ce_fwd(p, DType(dt), nullptr);
}
int emu_ce_bwd(int dt, const void* h, const void* head_w, const void* head_t, const void* head_b, const int64_t* y,
               void* lse, const void* g, void* dh, void* dw, void* db, int64_t R, int H, int splits,
               int64_t rows_per_split) {
  CeParams p = ce(h, head_w, head_t, head_b, y, lse, R, H);
  p.g = g;
  p.dh = dh;
  p.dw = dw;
  p.db = db;
  p.splits = splits;
  p.rows_per_split = rows_per_split;
  return ce_bwd(p, DType(dt), nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
LOW = (torch.float16, torch.bfloat16)
I64 = ctypes.c_int64


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# What gru_patch_cuda.cpp does around the kernels, with the same torch ops on the CPU
# ---------------------------------------------------------------------------------------------


def input_parts(x):
    """(byte table [256, 3h], gc [M, 3h]) in the accumulation dtype, as the binding's input_parts."""
    a = R.acc_dtype(x["context"].dtype)
    h = x["context"].shape[1]
    w = x["weight_ih"].detach().to(a)
    table = (x["byte_emb"].detach().to(a) @ w[:, :h].T).contiguous()
    gc = torch.addmm(x["bias_ih"].detach().to(a), x["context"].detach().to(a), w[:, h:].T).contiguous()
    return table, gc


def recurrence_fwd(kernels, x, prev):
    """(hidden in the input dtype, hidden in the acc dtype, gates [M, P, 4h])."""
    dtype = x["context"].dtype
    a = R.acc_dtype(dtype)
    (M, h), P = x["context"].shape, prev.shape[1]
    table, gc = input_parts(x)
    w_hh_t, b_hh = x["weight_hh"].detach().t().contiguous(), x["bias_hh"].detach().contiguous()
    prev = prev.long().contiguous()
    hid, gates = _nan((M, P, h), a), _nan((M, P, 4 * h), a)
    out = None if dtype == a else _nan((M, P, h), dtype)
    assert kernels.emu_gru_fwd(DTYPE_CODE[dtype], ptr(gc), ptr(table), ptr(prev), ptr(w_hh_t), ptr(b_hh), ptr(hid),
                               ptr(out), ptr(gates), I64(M), P, h) == 0
    return (hid if out is None else out), hid, gates


def recurrence_bwd(kernels, grad_hidden, x, prev, hid, gates):
    """The six decode gradients in the input dtype (the binding's recurrence_bwd)."""
    dtype = x["context"].dtype
    a = R.acc_dtype(dtype)
    (M, h), P = x["context"].shape, prev.shape[1]
    dH = grad_hidden.to(a).contiguous()
    w_hh = x["weight_hh"].detach().contiguous()
    dgi, dgh = _nan((M, P, 3 * h), a), _nan((M, P, 3 * h), a)
    assert kernels.emu_gru_bwd(DTYPE_CODE[dtype], ptr(dH), ptr(hid), ptr(gates), ptr(w_hh), ptr(dgi), ptr(dgh), I64(M),
                               P, h) == 0
    w, ctx = x["weight_ih"].detach().to(a), x["context"].detach().to(a)
    dgc = dgi.sum(1)
    dw_hh = torch.zeros(3 * h, h, dtype=a)
    for t in range(1, P):
        dw_hh.addmm_(dgh[:, t].T, hid[:, t - 1])
    dtable = torch.zeros(256, 3 * h, dtype=a).index_add_(0, prev.reshape(-1).long(), dgi.reshape(-1, 3 * h))
    grads = {
        "context": dgc @ w[:, h:],
        "byte_emb": dtable @ w[:, :h],
        "weight_ih": torch.cat([dtable.T @ x["byte_emb"].detach().to(a), dgc.T @ ctx], 1),
        "weight_hh": dw_hh,
        "bias_ih": dgc.sum(0),
        "bias_hh": dgh.sum((0, 1)),
    }
    return {k: v.to(dtype) for k, v in grads.items()}


def loss_fwd(kernels, x, targets, sos):
    """(loss [M, P], lse [M, P], hidden [M, P, h] acc, gates), as the binding's loss_fwd_cuda."""
    dtype = x["context"].dtype
    a = R.acc_dtype(dtype)
    (M, h), P = x["context"].shape, targets.shape[1]
    _, hid, gates = recurrence_fwd(kernels, x, R.teacher_inputs(targets, sos))
    y = targets.long().contiguous()
    head_t, head_b = x["head_weight"].detach().t().contiguous(), x["head_bias"].detach().contiguous()
    loss, lse = _nan((M, P), a), _nan((M, P), a)
    assert kernels.emu_ce_fwd(DTYPE_CODE[dtype], ptr(hid), ptr(head_t), ptr(head_b), ptr(y), ptr(lse), ptr(loss),
                              I64(M * P), h) == 0
    return loss, lse, hid, gates


def loss_bwd(kernels, grad_loss, x, targets, sos, hid, gates, lse, max_splits=128):
    """The eight loss gradients, as the binding's loss_bwd_cuda (which splits the rows max_splits = 128 ways)."""
    dtype = x["context"].dtype
    a = R.acc_dtype(dtype)
    (M, h), P = x["context"].shape, targets.shape[1]
    y, g = targets.long().contiguous(), grad_loss.to(a).contiguous()
    head_w = x["head_weight"].detach().contiguous()
    head_t, head_b = head_w.t().contiguous(), x["head_bias"].detach().contiguous()
    blocks = -(-M * P // 16)
    splits = max(1, min(blocks, max_splits))
    dH = _nan((M, P, h), a)
    dw, db = torch.zeros(splits, 256, h, dtype=a), torch.zeros(splits, 256, dtype=a)
    assert kernels.emu_ce_bwd(DTYPE_CODE[dtype], ptr(hid), ptr(head_w), ptr(head_t), ptr(head_b), ptr(y), ptr(lse),
                              ptr(g), ptr(dH), ptr(dw), ptr(db), I64(M * P), h, splits,
                              I64(-(-blocks // splits) * 16)) == 0
    grads = recurrence_bwd(kernels, dH, x, R.teacher_inputs(targets, sos), hid, gates)
    grads["head_weight"], grads["head_bias"] = dw.sum(0).to(dtype), db.sum(0).to(dtype)
    return grads


def sample(kernels, x, P, *, temperature=0.0, top_k=None, prefix=None, sos=0, seed=None):
    """The binding's sample_cuda: bytes [M, P]."""
    dtype = x["context"].dtype
    M, h = x["context"].shape
    table, gc = input_parts(x)
    w_hh_t, b_hh = x["weight_hh"].t().contiguous(), x["bias_hh"].contiguous()
    head_t, head_b = x["head_weight"].t().contiguous(), x["head_bias"].contiguous()
    pre = None if prefix is None else prefix.long().contiguous()
    out = torch.full((M, P), -1, dtype=torch.int64)
    greedy = temperature == 0
    assert kernels.emu_gru_sample(DTYPE_CODE[dtype], ptr(gc), ptr(table), ptr(w_hh_t), ptr(b_hh), ptr(head_t),
                                  ptr(head_b), ptr(pre), None if greedy else ptr(seed), ptr(out), I64(M), P, h,
                                  0 if pre is None else pre.shape[1], sos, top_k or 0, int(greedy),
                                  ctypes.c_double(0.0 if greedy else 1 / temperature)) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Decode: forward hidden states, backward through the gate gradients
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    (1, 1, 32, torch.float32), (3, 4, 256, torch.float32), (37, 4, 32, torch.float32), (37, 1, 256, torch.float32),
    (37, 4, 300, torch.float32),  # two hidden units per thread; the backward's 77 KiB of shared memory needs opt-in
    (3, 4, 32, torch.float64), (37, 4, 256, torch.bfloat16), (3, 4, 32, torch.bfloat16), (37, 4, 32, torch.float16),
]


@pytest.mark.parametrize("M,P,h,dtype", DECODE_CASES, ids=[shape_id(*c) for c in DECODE_CASES])
def test_decode_emulated(kernels, M, P, h, dtype):
    x, b = make_inputs(M, P, h, dtype)
    hidden, hid, gates = recurrence_fwd(kernels, x, b)
    grad_hidden = upstream(hidden.shape).to(dtype)  # what autograd hands the backward
    grads = recurrence_bwd(kernels, grad_hidden, x, b, hid, gates)
    ref, ref_grads = decode_oracle(M, P, h, dtype)
    names = [k for k in DECODE_NAMES if not (P == 1 and k == "weight_hh")]  # h_0 = 0: no gradient reaches W_hh
    if dtype not in LOW:
        assert_close("hidden", hidden, ref)
        for k in names:
            assert_close(f"d{k}", grads[k], ref_grads[k])
        return
    xr = {k: v.clone().requires_grad_() for k, v in x.items()}
    same, same_grads = run_with_grads(lambda: R.gru_patch_decode_reference(*decode_args(xr, b)), xr, DECODE_NAMES, True)
    assert_low_precision_close("hidden", hidden, ref, same)
    for k in names:
        assert_low_precision_close(f"d{k}", grads[k], ref_grads[k], same_grads[k])


# ---------------------------------------------------------------------------------------------
# Fused loss: recurrence + cross-entropy head, and back
# ---------------------------------------------------------------------------------------------

LOSS_CASES = [  # (M, P, h, dtype, max_splits): 3 splits give the head-weight kernel several row tiles per split
    (1, 1, 32, torch.float32, 128), (3, 4, 256, torch.float32, 128), (37, 4, 32, torch.float32, 128),
    (37, 4, 256, torch.float32, 3), (37, 1, 300, torch.float32, 128), (3, 4, 32, torch.float64, 2),
    (37, 4, 256, torch.bfloat16, 128), (37, 4, 32, torch.float16, 3),
]


@pytest.mark.parametrize("M,P,h,dtype,max_splits", LOSS_CASES,
                         ids=[shape_id(*c[:4]) + f"-splits{c[4]}" for c in LOSS_CASES])
def test_loss_emulated(kernels, M, P, h, dtype, max_splits):
    x, y = make_inputs(M, P, h, dtype)
    loss, lse, hid, gates = loss_fwd(kernels, x, y, sos=7)
    g = upstream(loss.shape).to(loss)
    grads = loss_bwd(kernels, g, x, y, 7, hid, gates, lse, max_splits)
    ref, ref_grads = loss_oracle(M, P, h, dtype, sos=7, reduction="none")
    logits = hid.double() @ x["head_weight"].double().T + x["head_bias"].double()
    assert_close("lse", lse, torch.logsumexp(logits, -1), tol=1e-6 if dtype != torch.float64 else 1e-12)
    names = [k for k in FLOAT_NAMES if not (P == 1 and k == "weight_hh")]
    if dtype not in LOW:
        assert_close("loss", loss, ref)
        for k in names:
            assert_close(f"d{k}", grads[k], ref_grads[k])
        return
    xr = {k: v.clone().requires_grad_() for k, v in x.items()}
    same, same_grads = run_with_grads(lambda: R.gru_patch_loss_reference(*loss_args(xr, y), sos=7, reduction="none"), xr, FLOAT_NAMES,
                                      True)
    assert_low_precision_close("loss", loss.to(dtype), ref, same.to(dtype))
    for k in names:
        assert_low_precision_close(f"d{k}", grads[k], ref_grads[k], same_grads[k])


# ---------------------------------------------------------------------------------------------
# Sampling: greedy bytes equal the oracle's argmax; seeded draws equal the oracle's bytes
# ---------------------------------------------------------------------------------------------

GREEDY_CASES = [  # (M, P, h, dtype, prefix_len, ties)
    (1, 1, 32, torch.float32, 0, False), (3, 4, 32, torch.float32, 0, False), (37, 4, 256, torch.float32, 2, False),
    (37, 4, 32, torch.float64, 1, False), (37, 4, 256, torch.bfloat16, 2, False), (37, 4, 32, torch.float16, 0, False),
    (37, 4, 32, torch.float32, 1, True),
]


def _sample_inputs(M, P, h, dtype, prefix_len, ties=False):
    """Peaky distributions (no near-ties in the argmax), or with ties: the head's rows for bytes v, v + 1,
    v + 128, v + 129 (v even, < 128) are copies, so every logit comes four times, in one lane's entries
    and in another lane's."""
    x, _ = make_inputs(M, P, h, dtype, head_scale=4.0)
    if ties:
        for name in ("head_weight", "head_bias"):
            x[name] = x[name][torch.arange(256) & 0x7E].contiguous()
    prefix = torch.randint(0, 256, (M, prefix_len), generator=torch.Generator().manual_seed(5))
    return x, (prefix if prefix_len else None)


def _oracle_sample(x, P, **kw):
    """The naive sampler in float64 on the same (rounded) values: the kernels keep h in fp32 or fp64."""
    return R.naive_gru_patch_sample(*sample_args({k: v.double() for k, v in x.items()}), patch_size=P, **kw)


@pytest.mark.parametrize("M,P,h,dtype,prefix_len,ties", GREEDY_CASES,
                         ids=[shape_id(*c[:4]) + f"-prefix{c[4]}" + ("-ties" if c[5] else "") for c in GREEDY_CASES])
def test_greedy_sample_emulated_equals_oracle_argmax(kernels, M, P, h, dtype, prefix_len, ties):
    x, prefix = _sample_inputs(M, P, h, dtype, prefix_len, ties)
    out = sample(kernels, x, P, prefix=prefix, sos=3)
    ref = _oracle_sample(x, P, prefix=prefix, sos=3)
    assert torch.equal(out, ref), f"{(out != ref).sum()} of {out.numel()} bytes differ"
    if ties:
        assert not (out[:, prefix_len:] & 0x81).any(), "a tie must go to the lowest byte"


SEEDED_CASES = [  # (M, P, h, dtype, prefix_len, temperature, top_k, ties)
    (37, 4, 256, torch.float32, 0, 0.9, None, False), (37, 4, 32, torch.float32, 1, 0.7, 5, False),
    (3, 4, 256, torch.bfloat16, 2, 1.3, 40, False), (1, 1, 32, torch.float32, 0, 1.0, 1, False),
    (37, 4, 32, torch.float32, 0, 0.8, 3, True),  # each logit comes 4 times: top-3 keeps 4 bytes
]


@pytest.mark.parametrize("M,P,h,dtype,prefix_len,temperature,top_k,ties", SEEDED_CASES,
                         ids=[shape_id(*c[:4]) + f"-prefix{c[4]}-T{c[5]}-top{c[6]}" + ("-ties" if c[7] else "")
                              for c in SEEDED_CASES])
def test_seeded_sample_emulated_equals_oracle(kernels, M, P, h, dtype, prefix_len, temperature, top_k, ties):
    """The kernel hashes the reference's counter (seed, row, step): the same seed draws the same bytes (up to
    rounding at a CDF edge, which these cases do not hit)."""
    x, prefix = _sample_inputs(M, P, h, dtype, prefix_len, ties)
    seeds = [R.draw_seed(torch.Generator().manual_seed(s), torch.device("cpu")) for s in (8, 9)]
    kw = dict(temperature=temperature, top_k=top_k, prefix=prefix, sos=1)
    outs = [sample(kernels, x, P, seed=s, **kw) for s in seeds]
    for out, seed in zip(outs, seeds):
        ref = _oracle_sample(x, P, seed=seed, **kw)
        assert torch.equal(out, ref), f"{(out != ref).sum()} of {out.numel()} bytes differ"
    if M * (P - prefix_len) > 20 and top_k != 1:
        assert not torch.equal(outs[0], outs[1]), "two seeds should draw different bytes"


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_nan_and_infinite_logits_emulated(kernels, temperature, top_k):
    """torch.argmax's pick (tests/ops/test_gru_patch.py): the first NaN, else the first +inf, greedy or sampling."""
    seed = R.draw_seed(torch.Generator().manual_seed(8), torch.device("cpu"))
    for value, bad, expected in ((float("nan"), (140, 7, 201), 7), (float("inf"), (9, 100), 9)):
        x, _ = _sample_inputs(37, 3, 32, torch.float32, 0)
        x["head_bias"][list(bad)] = value
        out = sample(kernels, x, 3, temperature=temperature, top_k=top_k, seed=seed)
        assert (out == expected).all(), (value, out.unique())


def test_emulation_sees_every_launch():
    text = for_gcc(SOURCE.read_text())
    assert text.count("emu_launch(") == 6  # recurrence fwd and bwd, sampling, cross-entropy fwd, dh and dW
