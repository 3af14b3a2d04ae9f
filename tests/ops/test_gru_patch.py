"""gru_patch_decode / gru_patch_loss / gru_patch_sample (docs/ops.md §1.3): every backend against the float64 oracle.

The Triton backend's interpreter tests live in test_gru_patch_triton.py; they reuse the helpers here.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from agiformer_kernels import BackendError, gru_patch_byte_table, gru_patch_decode, gru_patch_loss, gru_patch_sample
from agiformer_kernels.ops.gru_patch import reference as R
from tests.utils import assert_close, assert_low_precision_close

CUDA = pytest.mark.gpu
FLOAT_NAMES = ("context", "byte_emb", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "head_weight", "head_bias")
DECODE_NAMES = FLOAT_NAMES[:6]
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SHAPES = [(M, P, h) for M in (1, 3, 1000) for P in (1, 4, 8) for h in (32, 256)]
# float64 runs (slow BLAS) and the reference's own checks take the h = 32 shapes and one large h = 256
SHAPES64 = [s for s in SHAPES if s[2] == 32] + [(3, 8, 256), (1000, 4, 256)]


def shape_id(M, P, h, dtype=None) -> str:
    return f"M{M}-P{P}-h{h}" + (f"-{DTYPE_IDS[dtype]}" if dtype is not None else "")


# ---------------------------------------------------------------------------------------------
# Inputs and oracles (shared with test_gru_patch_triton.py)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _inputs64(M: int, P: int, h: int) -> tuple:
    """nn.GRU-like initialisation (uniform ±1/√h), N(0, 1) latents and embeddings, float64."""
    g = torch.Generator().manual_seed(M * 7919 + P * 131 + h)
    bound = 1 / math.sqrt(h)

    def u(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * bound

    floats = (torch.randn(M, h, generator=g, dtype=torch.float64), torch.randn(256, h, generator=g, dtype=torch.float64),
              u(3 * h, 2 * h), u(3 * h, h), u(3 * h), u(3 * h), u(256, h), u(256))
    return floats, torch.randint(0, 256, (M, P), generator=g)


def make_inputs(M, P, h, dtype, device="cpu", requires_grad=False, head_scale=1.0):
    """(dict of the 8 float tensors, bytes [M, P] int64), the same values for every dtype.
    head_scale sharpens the head (peakier byte distributions for the sampling tests)."""
    floats, bytes_ = _inputs64(M, P, h)
    x = {}
    for name, t in zip(FLOAT_NAMES, floats):
        t = t * head_scale if name.startswith("head") else t
        x[name] = t.to(device=device, dtype=dtype, copy=True).requires_grad_(requires_grad)
    return x, bytes_.to(device, copy=True)


def decode_args(x, prev_bytes):
    return (x["context"], prev_bytes, x["byte_emb"], x["weight_ih"], x["weight_hh"], x["bias_ih"], x["bias_hh"])


def loss_args(x, targets):
    return decode_args(x, targets) + (x["head_weight"], x["head_bias"])


def sample_args(x):
    return tuple(x[n] for n in FLOAT_NAMES)


def upstream(shape, seed=11) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def as64(x, names=FLOAT_NAMES):
    return {k: x[k].detach().cpu().double().requires_grad_() for k in names}


@functools.lru_cache(maxsize=None)
def _decode_oracle(M, P, h, dtype):
    x, b = make_inputs(M, P, h, dtype)
    x64 = as64(x, DECODE_NAMES)
    hidden = R.naive_gru_patch_decode(*decode_args(x64, b))
    hidden.backward(upstream(hidden.shape))
    return hidden.detach(), {k: v.grad for k, v in x64.items()}


def decode_oracle(M, P, h, dtype=torch.float64):
    """Naive float64 hidden states of make_inputs(M, P, h, dtype) (the values rounded to dtype, then run in
    float64) and the gradients of <hidden, upstream>. Cached: tests of several backends share it."""
    return _decode_oracle(M, P, h, dtype)


@functools.lru_cache(maxsize=None)
def _loss_oracle(M, P, h, dtype, sos, reduction):
    x, b = make_inputs(M, P, h, dtype)
    x64 = as64(x)
    loss = R.naive_gru_patch_loss(*loss_args(x64, b), sos=sos, reduction=reduction)
    loss.backward(upstream(loss.shape) if reduction == "none" else None)
    return loss.detach(), {k: v.grad for k, v in x64.items()}


def loss_oracle(M, P, h, dtype, sos=0, reduction="mean"):
    return _loss_oracle(M, P, h, dtype, sos, reduction)


def run_with_grads(fn, x, names, grad_out_shape=None):
    out = fn()
    out.backward(upstream(out.shape).to(out) if grad_out_shape is not None else None)
    return out.detach(), {k: x[k].grad for k in names}


def next_byte_probs(x, prefix, temperature, top_k=None):
    """Exact float64 distribution [M, 256] of the byte after the forced prefix [M, r]."""
    x64 = {k: v.detach().cpu().double() for k, v in x.items()}
    r = prefix.shape[1]
    fed = R.teacher_inputs(torch.cat([prefix.cpu(), prefix[:, :1].cpu()], 1), 0)  # [sos, prefix]
    hidden = R.naive_gru_patch_decode(*decode_args(x64, fed))
    logits = hidden[:, r] @ x64["head_weight"].T + x64["head_bias"]
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    return torch.softmax(logits / temperature, -1)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    keep = exp > 0
    assert int((obs[~keep]).sum()) == 0, "samples fell where the distribution has no mass"
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    # Wilson–Hilferty normal approximation of the chi-square upper tail
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def check_decode(backend, M, P, h, dtype, device="cpu"):
    """Hidden states and all six gradients against the oracle, per docs/ops.md §3."""
    x, b = make_inputs(M, P, h, dtype, device, requires_grad=True)
    hidden, grads = run_with_grads(lambda: gru_patch_decode(*decode_args(x, b), backend=backend), x, DECODE_NAMES,
                                   grad_out_shape=True)
    ref, ref_grads = decode_oracle(M, P, h, dtype)
    if dtype in (torch.float16, torch.bfloat16):
        xr = {k: v.detach().cpu().requires_grad_() for k, v in x.items()}
        same, same_grads = run_with_grads(lambda: R.gru_patch_decode_reference(*decode_args(xr, b.cpu())), xr, DECODE_NAMES, True)
        assert_low_precision_close("hidden", hidden.cpu(), ref, same)
        for k in DECODE_NAMES:
            if P == 1 and k == "weight_hh":  # h_0 = 0: no gradient reaches W_hh
                assert not grads[k].any()
                continue
            assert_low_precision_close(f"d{k}", grads[k].cpu(), ref_grads[k], same_grads[k])
        return
    assert_close("hidden", hidden.cpu(), ref)
    for k in DECODE_NAMES:
        if P == 1 and k == "weight_hh":
            assert not grads[k].any()
            continue
        assert_close(f"d{k}", grads[k].cpu(), ref_grads[k])


def check_loss(backend, M, P, h, dtype, reduction, device="cpu"):
    x, b = make_inputs(M, P, h, dtype, device, requires_grad=True)
    fn = lambda: gru_patch_loss(*loss_args(x, b), sos=7, reduction=reduction, backend=backend)  # noqa: E731
    loss, grads = run_with_grads(fn, x, FLOAT_NAMES, grad_out_shape=True if reduction == "none" else None)
    assert loss.dtype == R.acc_dtype(dtype), "the loss is fp32 (fp64 for fp64 inputs)"
    ref, ref_grads = loss_oracle(M, P, h, dtype, sos=7, reduction=reduction)
    if dtype in (torch.float16, torch.bfloat16):
        xr = {k: v.detach().cpu().requires_grad_() for k, v in x.items()}
        same, same_grads = run_with_grads(
            lambda: R.gru_patch_loss_reference(*loss_args(xr, b.cpu()), sos=7, reduction=reduction), xr, FLOAT_NAMES,
            True if reduction == "none" else None)
        assert_low_precision_close("loss", loss.cpu().to(dtype), ref, same.to(dtype))
        for k in FLOAT_NAMES:
            if not (P == 1 and k == "weight_hh"):
                assert_low_precision_close(f"d{k}", grads[k].cpu(), ref_grads[k], same_grads[k])
        return
    assert_close("loss", loss.cpu(), ref)
    for k in FLOAT_NAMES:
        if not (P == 1 and k == "weight_hh"):
            assert_close(f"d{k}", grads[k].cpu(), ref_grads[k])


def check_greedy(backend, M, P, h, dtype, device="cpu", prefix_len=0):
    """Temperature 0 equals the naive reference's argmax bytes exactly (float64 and float32)."""
    x, _ = make_inputs(M, P, h, dtype, device, head_scale=4.0)
    prefix = torch.randint(0, 256, (M, prefix_len), generator=torch.Generator().manual_seed(5)).to(device)
    out = gru_patch_sample(*sample_args(x), patch_size=P, prefix=prefix if prefix_len else None, sos=3,
                           backend=backend)
    ref = R.naive_gru_patch_sample(*sample_args(x), patch_size=P, prefix=prefix if prefix_len else None, sos=3)
    assert out.dtype == torch.int64 and out.shape == (M, P)
    assert torch.equal(out.cpu(), ref.cpu()), f"{(out.cpu() != ref.cpu()).sum()} of {out.numel()} bytes differ"


def check_distribution(backend, device="cpu", M=20000, temperature=0.8, top_k=None):
    """The byte after a forced prefix, over M identical patches (independent draws), fits the exact
    softmax(logits / T) (restricted to the top_k logits) by a chi-square test."""
    h, r = 32, 2
    x1, _ = make_inputs(1, 3, h, torch.float32, head_scale=6.0)
    x = {k: v.expand(M, *v.shape[1:]).contiguous().to(device) if k == "context" else v.to(device)
         for k, v in x1.items()}
    prefix = torch.tensor([[65, 66]]).expand(M, r).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(1234)
    out = gru_patch_sample(*sample_args(x), patch_size=r + 1, temperature=temperature, top_k=top_k, prefix=prefix,
                           generator=gen, backend=backend).cpu()
    assert torch.equal(out[:, :r], prefix.cpu()), "the prefix must come back as given"
    probs = next_byte_probs(x1, prefix[:1], temperature, top_k)[0]
    assert (probs > 0.01).sum() >= 8, "test setup: the distribution should spread over several bytes"
    counts = torch.bincount(out[:, r], minlength=256)
    p = chi_square_pvalue(counts, probs)
    assert p > 1e-4, f"chi-square p-value {p:.2e}: samples do not follow the softmax"


# ---------------------------------------------------------------------------------------------
# The reference itself: efficient form against the naive oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,P,h", SHAPES64, ids=[shape_id(*s) for s in SHAPES64])
def test_reference_decode_matches_naive(M, P, h):
    x, b = make_inputs(M, P, h, torch.float64, requires_grad=True)
    hidden, grads = run_with_grads(lambda: R.gru_patch_decode_reference(*decode_args(x, b)), x, DECODE_NAMES, True)
    ref, ref_grads = decode_oracle(M, P, h)
    assert_close("hidden", hidden, ref, tol=1e-10)
    for k in DECODE_NAMES:
        if not (P == 1 and k == "weight_hh"):
            assert_close(f"d{k}", grads[k], ref_grads[k], tol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M,P,h", [(1, 1, 32), (3, 4, 256), (1000, 8, 32)], ids=lambda v: str(v))
def test_reference_loss_matches_naive(M, P, h, reduction):
    x, b = make_inputs(M, P, h, torch.float64, requires_grad=True)
    fn = lambda: R.gru_patch_loss_reference(*loss_args(x, b), sos=7, reduction=reduction)  # noqa: E731
    loss, grads = run_with_grads(fn, x, FLOAT_NAMES, True if reduction == "none" else None)
    ref, ref_grads = loss_oracle(M, P, h, torch.float64, sos=7, reduction=reduction)
    assert_close("loss", loss, ref, tol=1e-10)
    for k in FLOAT_NAMES:
        if not (P == 1 and k == "weight_hh"):
            assert_close(f"d{k}", grads[k], ref_grads[k], tol=1e-10)


def test_naive_decode_is_nn_gru():
    """The oracle is PyTorch's GRU on [byte_emb[b] | context] (v1's head), weights shared."""
    M, P, h = 5, 4, 32
    x, b = make_inputs(M, P, h, torch.float64)
    gru = torch.nn.GRU(2 * h, h, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{name}_l0").copy_(x[name])
        inp = torch.cat([x["byte_emb"][b], x["context"][:, None].expand(M, P, h)], -1)
        expected, _ = gru(inp)
    assert_close("hidden", R.naive_gru_patch_decode(*decode_args(x, b)), expected, tol=1e-12)


def test_naive_loss_is_cross_entropy_of_v1_logits():
    M, P, h = 6, 4, 32
    x, y = make_inputs(M, P, h, torch.float64)
    prev = torch.cat([torch.full((M, 1), 9), y[:, :-1]], 1)
    logits = R.naive_gru_patch_decode(*decode_args(x, prev)) @ x["head_weight"].T + x["head_bias"]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert_close("loss", R.naive_gru_patch_loss(*loss_args(x, y), sos=9), expected, tol=1e-12)


@pytest.mark.parametrize("M,P,h", [(1, 1, 32), (3, 4, 256), (1000, 8, 32)], ids=lambda v: str(v))
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (0.9, None), (0.7, 5)])
def test_reference_sample_matches_naive(M, P, h, temperature, top_k):
    x, _ = make_inputs(M, P, h, torch.float64, head_scale=4.0)
    prefix = torch.randint(0, 256, (M, P // 2), generator=torch.Generator().manual_seed(2))
    seed = R.draw_seed(torch.Generator().manual_seed(3), torch.device("cpu"))
    kw = dict(patch_size=P, temperature=temperature, top_k=top_k, prefix=prefix, sos=1)
    out = R.sample_seeded(*sample_args(x), seed=seed, **kw)
    assert torch.equal(out, R.naive_gru_patch_sample(*sample_args(x), seed=seed, **kw))


def test_counter_hash_is_lowbias32():
    """The torch form of the RNG hash (16-bit split multiplies) equals 32-bit unsigned arithmetic."""

    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    values = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 123456789, 0xDEADBEEF]
    got = R._mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix(v) for v in values]
    seed = torch.tensor([0x12345678, 0x9ABCDEF0])
    u = R.counter_uniform(seed, torch.tensor([0, 5]), 3, torch.float64)
    expected = [(mix(mix(mix(0x12345678 ^ row) ^ 0x9ABCDEF0) ^ 3) >> 8) / 2**24 for row in (0, 5)]
    assert u.tolist() == expected


# ---------------------------------------------------------------------------------------------
# Backends against the oracle: reference, cpu (C++), cuda (GPU only)
# ---------------------------------------------------------------------------------------------

BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=CUDA)]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


DECODE_CASES = [(*s, torch.float32) for s in SHAPES] + [(*s, torch.float64) for s in SHAPES64] + [
    (1, 4, 32, torch.bfloat16), (3, 8, 256, torch.bfloat16), (1000, 4, 256, torch.bfloat16),
    (1, 4, 32, torch.float16), (65, 8, 256, torch.float16)]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("M,P,h,dtype", DECODE_CASES, ids=[shape_id(*s) for s in DECODE_CASES])
def test_decode(backend, M, P, h, dtype):
    check_decode(backend, M, P, h, dtype, device_of(backend))


LOSS_CASES = [
    (1, 1, 32, torch.float64, "none"), (3, 4, 256, torch.float64, "mean"), (1000, 8, 32, torch.float64, "none"),
    (1, 1, 32, torch.float32, "mean"), (3, 4, 256, torch.float32, "none"), (1000, 8, 32, torch.float32, "mean"),
    (1000, 4, 256, torch.float32, "none"), (1000, 4, 256, torch.float32, "sum"),
    (3, 4, 256, torch.bfloat16, "none"), (1000, 4, 256, torch.bfloat16, "mean"), (65, 8, 32, torch.float16, "mean"),
]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("M,P,h,dtype,reduction", LOSS_CASES, ids=[shape_id(*s[:4]) + f"-{s[4]}" for s in LOSS_CASES])
def test_loss(backend, M, P, h, dtype, reduction):
    check_loss(backend, M, P, h, dtype, reduction, device_of(backend))


def test_cpu_loss_backward_reuses_the_head_gradient_of_its_forward(monkeypatch):
    """Under a mean or a sum the C++ forward also takes the head's gradient; the backward must reuse it (scaled by
    the one upstream scalar), not recompute the logits in gru_patch_loss_bwd. A mean's own backward materialises
    the [M, P] gradient, so the op could not tell it was one scalar: this ran the head twice (~30% of a step)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for reduction in ("mean", "sum"):
            x, b = make_inputs(5, 3, 32, torch.float32, requires_grad=True)
            gru_patch_loss(*loss_args(x, b), reduction=reduction, backend="cpu").backward()
    called = {e.key for e in prof.key_averages()}
    assert "agiformer_kernels::gru_patch_decode_bwd" in called, called
    assert "agiformer_kernels::gru_patch_loss_bwd" not in called, called


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    x, b = make_inputs(3, 3, 4, torch.float64, requires_grad=True)
    dec = [x[k] for k in DECODE_NAMES]

    def decode(c, e, wi, wh, bi, bh):
        return gru_patch_decode(c, b, e, wi, wh, bi, bh, backend=backend)

    assert torch.autograd.gradcheck(decode, dec, fast_mode=True)

    def loss(c, e, wi, wh, bi, bh, hw, hb):
        return gru_patch_loss(c, b, e, wi, wh, bi, bh, hw, hb, sos=5, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, [x[k] for k in FLOAT_NAMES], fast_mode=True)


# split (M < 11), lanes (11 <= M <= 128; h = 37: the k and row tails of its blocks), tiled
# (M = 1, h = 100 and 200: the one-row product's row and k tails, h not a multiple of 16 or 64)
SAMPLE_SHAPES = [(1, 1, 32), (1, 4, 256), (1, 3, 100), (1, 4, 200), (3, 8, 32), (11, 4, 37), (16, 4, 256),
                 (20, 3, 200), (40, 4, 256), (1000, 4, 256), (1000, 8, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,P,h", SAMPLE_SHAPES, ids=[shape_id(*s) for s in SAMPLE_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_greedy_sample_equals_reference_argmax(backend, M, P, h, dtype):
    check_greedy(backend, M, P, h, dtype, device_of(backend), prefix_len=min(P - 1, 2))
    check_greedy(backend, M, P, h, dtype, device_of(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_k", [(0.8, None), (1.3, 12)], ids=["T0.8", "T1.3-top12"])
def test_sample_distribution(backend, temperature, top_k):
    check_distribution(backend, device_of(backend), temperature=temperature, top_k=top_k)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("M,P,h", [(1, 4, 256), (16, 4, 256), (1000, 3, 32)], ids=lambda v: str(v))
def test_sample_same_bytes_as_reference_for_same_seed(backend, M, P, h):
    """Every backend hashes the same counter, so the same generator state gives the reference's bytes
    (up to rounding at a CDF edge, which these shapes do not hit)."""
    x, _ = make_inputs(M, P, h, torch.float32, device_of(backend), head_scale=4.0)
    kw = dict(patch_size=P, temperature=0.9, top_k=40)
    out = gru_patch_sample(*sample_args(x), generator=torch.Generator().manual_seed(8), backend=backend, **kw)
    ref = gru_patch_sample(*sample_args(x), generator=torch.Generator().manual_seed(8), backend="reference", **kw)
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 16, 200], ids=["split", "lanes", "tiled"])
@pytest.mark.parametrize("maxima", [(10, 5, 203, 2), (0, 5), (203, 140, 131)], ids=["inner", "first", "upper"])
def test_greedy_ties_take_the_first_index(backend, M, maxima):
    """Logits equal at several bytes (of different residues mod 4: the lanes argmax runs four chains; in both
    halves of the vocabulary: with h = 128 two threads split it) give the first of them, as torch.argmax."""
    device = device_of(backend)
    x, _ = make_inputs(M, 3, 128, torch.float32, device)
    x["head_weight"] = torch.zeros_like(x["head_weight"])
    x["head_bias"] = torch.zeros_like(x["head_bias"])
    x["head_bias"][list(maxima)] = 1.0
    out = gru_patch_sample(*sample_args(x), patch_size=3, backend=backend)
    assert (out == min(maxima)).all()


# split, lanes (1, 2 and 3 groups of 16), tiled
TABLE_SHAPES = [(1, 4, 256), (13, 3, 40), (20, 4, 200), (40, 4, 32), (140, 3, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,P,h", TABLE_SHAPES, ids=[shape_id(*s) for s in TABLE_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_sample_with_byte_table_equals_without(backend, M, P, h, dtype):
    """A byte table built once gives the bytes the call gets when it builds its own (greedy and seeded)."""
    device = device_of(backend)
    x, _ = make_inputs(M, P, h, dtype, device, head_scale=4.0)
    table = gru_patch_byte_table(x["byte_emb"], x["weight_ih"])
    assert table.dtype == R.acc_dtype(dtype) and table.shape == (256, 3 * h)
    prefix = torch.randint(0, 256, (M, 1), generator=torch.Generator().manual_seed(4)).to(device)
    for kw in (dict(), dict(prefix=prefix), dict(temperature=0.9, top_k=40), dict(temperature=1.2, prefix=prefix)):
        def run(**extra):
            gen = torch.Generator(device=device).manual_seed(8)
            return gru_patch_sample(*sample_args(x), patch_size=P, generator=gen, backend=backend, **kw, **extra)

        assert torch.equal(run(byte_table=table), run()), kw


def test_byte_table_is_the_byte_part_of_the_input_projection():
    x, _ = make_inputs(3, 2, 24, torch.float64)
    h = 24
    expected = x["byte_emb"] @ x["weight_ih"][:, :h].T
    assert_close("table", gru_patch_byte_table(x["byte_emb"], x["weight_ih"]), expected, tol=1e-12)
    bf16 = gru_patch_byte_table(x["byte_emb"].bfloat16(), x["weight_ih"].bfloat16())
    assert bf16.dtype == torch.float32
    with pytest.raises(ValueError, match="weight_ih"):
        gru_patch_byte_table(x["byte_emb"], x["weight_hh"])
    with pytest.raises(ValueError, match="weight_ih has dtype"):
        gru_patch_byte_table(x["byte_emb"], x["weight_ih"].float())


def test_sample_rejects_bad_byte_table():
    x, _ = make_inputs(2, 3, 16, torch.float32)
    table = gru_patch_byte_table(x["byte_emb"], x["weight_ih"])

    def sample(t):
        return gru_patch_sample(*sample_args(x), patch_size=3, byte_table=t)

    with pytest.raises(ValueError, match=r"byte_table must have shape \[256, 3h\]"):
        sample(table[:, :-1])
    with pytest.raises(TypeError, match="byte_table must be torch.float32"):
        sample(table.double())
    with pytest.raises(TypeError, match="byte_table must be a torch.Tensor"):
        sample(table.tolist())
    with pytest.raises(ValueError, match="byte_table"):  # the C++ op checks it too, for direct callers
        torch.ops.agiformer_kernels.gru_patch_sample(*sample_args(x), 3, 0.0, 0, None, 0, None, table[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_generator_state(backend):
    device = device_of(backend)
    x, _ = make_inputs(64, 4, 32, torch.float32, device, head_scale=4.0)

    def draw(gen):
        return gru_patch_sample(*sample_args(x), patch_size=4, temperature=1.0, generator=gen, backend=backend)

    gen = torch.Generator(device=device).manual_seed(42)
    first, second = draw(gen), draw(gen)
    assert not torch.equal(first, second), "the generator must advance between calls"
    assert torch.equal(first, draw(torch.Generator(device=device).manual_seed(42)))
    state = gen.get_state()
    third = draw(gen)
    gen.set_state(state)
    assert torch.equal(third, draw(gen))
    torch.manual_seed(7)
    default_a = gru_patch_sample(*sample_args(x), patch_size=4, temperature=1.0, backend=backend)
    torch.manual_seed(7)
    assert torch.equal(default_a, gru_patch_sample(*sample_args(x), patch_size=4, temperature=1.0, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_one_is_greedy(backend):
    x, _ = make_inputs(50, 4, 32, torch.float32, device_of(backend), head_scale=4.0)
    greedy = gru_patch_sample(*sample_args(x), patch_size=4, backend=backend)
    top1 = gru_patch_sample(*sample_args(x), patch_size=4, temperature=2.0, top_k=1, backend=backend)
    assert torch.equal(greedy, top1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_sampling_runs_greedy_like_fp32_reference(backend):
    """bf16 inputs: bytes are valid, prefix is kept, and greedy agrees with the bf16 reference on most rows
    (rounding of h may flip near-ties, so not all)."""
    device = device_of(backend)
    x, _ = make_inputs(200, 4, 32, torch.bfloat16, device, head_scale=4.0)
    prefix = torch.full((200, 1), 42, device=device)
    out = gru_patch_sample(*sample_args(x), patch_size=4, prefix=prefix, backend=backend)
    ref = gru_patch_sample(*sample_args(x), patch_size=4, prefix=prefix, backend="reference")
    assert out.dtype == torch.int64 and bool((out[:, 0] == 42).all())
    assert float((out == ref).double().mean()) > 0.9


# ---------------------------------------------------------------------------------------------
# Layout, edge cases, torch.library and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """context sliced from a wider projection, weights as transposed views, int32 bytes with a stride."""
    device = device_of(backend)
    M, P, h = 37, 4, 32
    x, b = make_inputs(M, P, h, torch.float32, device)
    wide = torch.randn(M, 3 * h, device=device)
    wide[:, h:2 * h] = x["context"]
    strided = {
        "context": wide[:, h:2 * h],
        "byte_emb": x["byte_emb"].T.contiguous().T,
        "weight_ih": x["weight_ih"].T.contiguous().T,
        "weight_hh": x["weight_hh"],
        "bias_ih": torch.stack([x["bias_ih"], x["bias_ih"]], 1)[:, 0],
        "bias_hh": x["bias_hh"],
        "head_weight": x["head_weight"].T.contiguous().T,
        "head_bias": x["head_bias"],
    }
    b32 = torch.stack([b, b], 2).to(torch.int32)[..., 1]
    assert not strided["context"].is_contiguous() and not b32.is_contiguous()
    assert_close("hidden", gru_patch_decode(*decode_args(strided, b32), backend=backend),
                 R.naive_gru_patch_decode(*decode_args(x, b)), tol=1e-5)
    assert_close("loss", gru_patch_loss(*loss_args(strided, b32), backend=backend),
                 R.naive_gru_patch_loss(*loss_args(x, b)), tol=1e-5)
    assert torch.equal(gru_patch_sample(*sample_args(strided), patch_size=P, backend=backend),
                       R.naive_gru_patch_sample(*sample_args(x), patch_size=P))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, b = make_inputs(3, 4, 32, torch.float32, device_of(backend), requires_grad=True)
    x0 = {k: (v[:0] if k == "context" else v) for k, v in x.items()}
    assert gru_patch_decode(*decode_args(x0, b[:0]), backend=backend).shape == (0, 4, 32)
    assert gru_patch_loss(*loss_args(x0, b[:0]), reduction="none", backend=backend).shape == (0, 4)
    assert gru_patch_sample(*sample_args(x0), patch_size=4, backend=backend).shape == (0, 4)


def test_cpu_opcheck():
    from agiformer_kernels.ops.gru_patch import cpp

    assert cpp.load_library() is None
    ops = torch.ops.agiformer_kernels
    for dtype in (torch.float32, torch.bfloat16):
        x, b = make_inputs(5, 3, 16, dtype, requires_grad=True)
        torch.library.opcheck(ops.gru_patch_decode_fwd.default, (*decode_args(x, b), True))
        for head_grad in (True, False):
            torch.library.opcheck(ops.gru_patch_loss_fwd.default, (*loss_args(x, b), 3, True, head_grad))
        # without save nothing is kept for a backward: only the schema and the fake kernel apply
        torch.library.opcheck(ops.gru_patch_loss_fwd.default, (*loss_args(x, b), 3, False, False),
                              test_utils=("test_schema", "test_faketensor"))
    x, b = make_inputs(5, 3, 16, torch.float32)
    seed = R.draw_seed(torch.Generator().manual_seed(0), torch.device("cpu"))
    table = gru_patch_byte_table(x["byte_emb"], x["weight_ih"])
    torch.library.opcheck(ops.gru_patch_sample.default, (*sample_args(x), 4, 0.7, 10, b[:, :1], 2, seed, table))
    torch.library.opcheck(ops.gru_patch_sample.default, (*sample_args(x), 3, 0.0, 0, None, 0, None, None))
    lanes = make_inputs(20, 3, 16, torch.float32)[0]  # the lanes kernel (11 <= M <= 128)
    torch.library.opcheck(ops.gru_patch_sample.default, (*sample_args(lanes), 3, 0.0, 0, None, 0, None, None))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    """A module calling the ops compiles with fullgraph=True and matches eager, gradients included."""

    class Head(torch.nn.Module):
        def __init__(self, x):
            super().__init__()
            self.w = torch.nn.ParameterDict({k: torch.nn.Parameter(v.detach().clone()) for k, v in x.items()})

        def forward(self, context, targets):
            w = self.w
            loss = gru_patch_loss(context, targets, w["byte_emb"], w["weight_ih"], w["weight_hh"], w["bias_ih"],
                                  w["bias_hh"], w["head_weight"], w["head_bias"], backend=backend)
            hidden = gru_patch_decode(context, targets, w["byte_emb"], w["weight_ih"], w["weight_hh"], w["bias_ih"],
                                      w["bias_hh"], backend=backend)
            return loss + hidden.square().mean()

    x, b = make_inputs(9, 4, 16, torch.float32)
    ctx = x.pop("context")
    head = Head(x)
    eager = head(ctx, b)
    eager.backward()
    eager_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")(ctx, b)
    compiled.backward()
    assert_close("loss", compiled.detach(), eager.detach(), tol=1e-6)
    for p, g in zip(head.parameters(), eager_grads):
        assert_close("grad", p.grad, g, tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Input validation: errors name the argument
# ---------------------------------------------------------------------------------------------


def _bad(name, value):
    x, b = make_inputs(4, 3, 8, torch.float32)
    x = dict(x, prev_bytes=b)
    x[name] = value
    return x


def _decode(x):
    return gru_patch_decode(x["context"], x["prev_bytes"], x["byte_emb"], x["weight_ih"], x["weight_hh"],
                            x["bias_ih"], x["bias_hh"])


@pytest.mark.parametrize("name,value,error", [
    ("context", torch.zeros(4, 3, 8), ValueError),
    ("context", torch.zeros(4, 8, dtype=torch.int64), TypeError),
    ("prev_bytes", torch.zeros(4, 3, dtype=torch.float32), TypeError),
    ("prev_bytes", torch.full((4, 3), 256), ValueError),
    ("prev_bytes", torch.full((4, 3), -1), ValueError),
    ("prev_bytes", torch.zeros(5, 3, dtype=torch.int64), ValueError),
    ("prev_bytes", torch.zeros(4, 0, dtype=torch.int64), ValueError),
    ("byte_emb", torch.zeros(255, 8), ValueError),
    ("weight_ih", torch.zeros(24, 8), ValueError),
    ("weight_hh", torch.zeros(24, 16), ValueError),
    ("bias_ih", torch.zeros(23), ValueError),
    ("bias_hh", torch.zeros(24, dtype=torch.float64), ValueError),
    ("bias_hh", [0.0] * 24, TypeError),
])
def test_decode_rejects_bad_inputs(name, value, error):
    with pytest.raises(error, match=name):
        _decode(_bad(name, value))


SAMPLE_BAD = [
    ("context", torch.zeros(4, 3, 8), ValueError),
    ("context", torch.zeros(4, 8, dtype=torch.int64), TypeError),
    ("byte_emb", torch.zeros(255, 8), ValueError),
    ("weight_ih", torch.zeros(24, 8), ValueError),
    ("weight_hh", torch.zeros(24, 8, dtype=torch.float64), ValueError),
    ("bias_ih", torch.zeros(24, dtype=torch.int32), TypeError),
    ("head_weight", [0.0] * 8, TypeError),
    ("weight_hh", None, TypeError),
    ("head_bias", torch.zeros(255), ValueError),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name,value,error", SAMPLE_BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SAMPLE_BAD)])
def test_sample_rejects_bad_tensors(backend, name, value, error):
    """The C++ op checks its own tensor arguments (the public function skips its Python checks for it):
    the same exception types, naming the argument, as the Python checks in front of the other backends."""
    x, b = make_inputs(4, 3, 8, torch.float32)
    args = [value if n == name else x[n] for n in FLOAT_NAMES]
    with pytest.raises(error, match=name):
        gru_patch_sample(*args, patch_size=3, backend=backend)


def test_loss_and_sample_reject_bad_arguments():
    x, b = make_inputs(4, 3, 8, torch.float32)
    args = loss_args(x, b)
    with pytest.raises(ValueError, match="reduction"):
        gru_patch_loss(*args, reduction="avg")
    with pytest.raises(ValueError, match="sos"):
        gru_patch_loss(*args, sos=256)
    with pytest.raises(TypeError, match="sos"):
        gru_patch_loss(*args, sos=1.0)
    with pytest.raises(ValueError, match="targets"):
        gru_patch_loss(*(args[:1] + (b + 300,) + args[2:]))
    with pytest.raises(ValueError, match="head_weight"):
        gru_patch_loss(*(args[:7] + (torch.zeros(255, 8), args[8])))
    s = sample_args(x)
    with pytest.raises(ValueError, match="patch_size"):
        gru_patch_sample(*s, patch_size=0)
    with pytest.raises(TypeError, match="patch_size"):
        gru_patch_sample(*s, patch_size=4.0)
    with pytest.raises(ValueError, match="temperature"):
        gru_patch_sample(*s, patch_size=4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        gru_patch_sample(*s, patch_size=4, top_k=0)
    with pytest.raises(ValueError, match="prefix"):
        gru_patch_sample(*s, patch_size=3, prefix=b)
    with pytest.raises(ValueError, match="prefix"):
        gru_patch_sample(*s, patch_size=4, prefix=b[:, :2] + 256)
    with pytest.raises(TypeError, match="prefix"):
        gru_patch_sample(*s, patch_size=4, prefix=b[:, :2].float())
    with pytest.raises(TypeError, match="generator"):
        gru_patch_sample(*s, patch_size=4, temperature=1.0, generator=0)


def test_named_backend_that_cannot_serve_raises():
    x, b = make_inputs(2, 2, 8, torch.float32)
    with pytest.raises(BackendError):
        gru_patch_decode(*decode_args(x, b), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 16, 200], ids=["split", "lanes", "tiled"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "T1"])
@pytest.mark.parametrize("nans", [(140, 7, 201), (201, 131)], ids=["lower", "upper"])
def test_nan_logits_give_the_first_nan_byte(backend, M, temperature, nans):
    """A NaN logit is the maximum, as for torch.argmax: a patch whose logits hold NaNs (a diverged model) gets
    the first NaN's byte on every backend, greedy or sampling (its running sums are all NaN). Before, the C++
    kernels skipped NaNs, each path in its own way."""
    device = device_of(backend)
    x, _ = make_inputs(M, 3, 128, torch.float32, device)
    x["head_bias"][list(nans)] = float("nan")
    gen = torch.Generator(device=device).manual_seed(3) if temperature else None
    out = gru_patch_sample(*sample_args(x), patch_size=3, temperature=temperature, generator=gen, backend=backend)
    assert (out == min(nans)).all(), out.unique()


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_logit_is_taken_when_sampling(backend):
    """+inf is the maximum: greedy takes it, and sampling too (the reference's running sums are NaN there)."""
    device = device_of(backend)
    x, _ = make_inputs(16, 3, 32, torch.float32, device)
    x["head_bias"][[9, 100]] = float("inf")
    for temperature in (0.0, 1.0):
        gen = torch.Generator(device=device).manual_seed(3) if temperature else None
        out = gru_patch_sample(*sample_args(x), patch_size=3, temperature=temperature, generator=gen, backend=backend)
        assert (out == 9).all(), (temperature, out.unique())
