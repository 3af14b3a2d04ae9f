"""Non-finite inputs: the C++ CPU kernels ("cpu" backend) put inf and NaN where the oracle does (docs/ops.md §1).

One inf, -inf or NaN in one entry of one float argument of each op. The output (and, for the training ops,
every gradient) must be non-finite exactly where the oracle's is, and NaN where the oracle's is NaN when a
NaN went in: an inf can come out as NaN or as ±inf depending on the order of a sum, so inf inputs are held
to non-finite-ness only. Sampled bytes must be the oracle's: a NaN logit counts as the maximum (§1.3).

The GRU ops are compared with the "reference" backend. The attention ops are compared with their naive
oracles: the blocked reference backends multiply the masked-out probabilities (0) of a block by all of its
v rows, so a non-finite v reaches queries of its block that never see it. The Triton backend is left out:
through its interpreter these cases would take minutes.
"""

from __future__ import annotations

import pytest
import torch

from agiformer_kernels import (
    available_backends,
    gru_patch_decode,
    gru_patch_loss,
    gru_patch_sample,
    linear_attention,
    linear_attention_step,
    sliding_window_attention,
    sliding_window_attention_step,
)
from agiformer_kernels.ops.linear_attention import reference as LR
from agiformer_kernels.ops.sliding_window_attention import reference as SR

VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def skip_without_cpu_backend(op: str) -> None:
    why = available_backends("cpu")[op]["cpu"]
    if not why.startswith("available"):  # "available; auto skips it: ..." runs when named
        pytest.skip(f"no cpu backend for {op}: {why}")


def assert_same_nonfinite(name: str, out: torch.Tensor, ref: torch.Tensor, nan_in: bool) -> None:
    """out is non-finite where ref is; with a NaN put in, also NaN where ref is NaN."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().cpu(), ref.detach().cpu()
    checks = [("non-finite", lambda x: ~torch.isfinite(x))] + ([("NaN", torch.isnan)] if nan_in else [])
    for what, mask in checks:
        got, want = mask(out), mask(ref)
        if not torch.equal(got, want):
            extra = (got & ~want).nonzero()[:4].tolist()
            missing = (want & ~got).nonzero()[:4].tolist()
            raise AssertionError(
                f"{name}: {what} at {int(got.sum())} of {out.numel()} entries, the oracle at {int(want.sum())}; "
                f"only here at {extra}, only in the oracle at {missing}"
            )


# ---------------------------------------------------------------------------------------------
# GRU patch decoder: decode, loss, sample
# ---------------------------------------------------------------------------------------------

GRU_NAMES = ("context", "byte_emb", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "head_weight", "head_bias")
# split across 2 threads (h = 128), lanes (AVX-512) or split, tiled with the byte table (M·P >= 512), one step
GRU_SHAPES = [(2, 3, 128), (20, 3, 32), (200, 3, 32), (5, 1, 24)]
GRU_SHAPE_IDS = [f"M{M}-P{P}-h{h}" for M, P, h in GRU_SHAPES]


def gru_sites(h: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Where to put the value: (argument, index). Byte 0 is sos, fed to every patch at step 0."""
    return {
        "context": ("context", (1, 5)),
        "byte_emb": ("byte_emb", (0, 5)),
        "weight_ih-byte": ("weight_ih", (7, 3)),
        "weight_ih-context": ("weight_ih", (2 * h + 7, h + 3)),
        "weight_hh-r": ("weight_hh", (4, 6)),
        "weight_hh-z": ("weight_hh", (h + 4, 6)),
        "weight_hh-n": ("weight_hh", (2 * h + 4, 6)),
        "bias_ih": ("bias_ih", (h + 4,)),
        "bias_hh": ("bias_hh", (2 * h + 4,)),
        "head_weight": ("head_weight", (9, 2)),
        "head_bias": ("head_bias", (9,)),
    }


GRU_SITES = list(gru_sites(1))
DECODE_SITES = [s for s in GRU_SITES if not s.startswith("head")]


def gru_inputs(M, P, h, site, value, dtype=torch.float32):
    """The 8 float tensors (nn.GRU-like scales) with `value` put at `site`, and targets [M, P]."""
    g = torch.Generator().manual_seed(M * 131 + P * 7 + h)
    s = h**-0.5
    shapes = [(M, h), (256, h), (3 * h, 2 * h), (3 * h, h), (3 * h,), (3 * h,), (256, h), (256,)]
    scales = [1.0, 1.0, s, s, s, s, s, s]
    x = {n: torch.randn(shape, generator=g, dtype=torch.float64) * c for n, shape, c in zip(GRU_NAMES, shapes, scales)}
    name, index = gru_sites(h)[site]
    x[name][index] = VALUES[value]
    targets = torch.randint(1, 256, (M, P), generator=g)
    return {n: t.to(dtype) for n, t in x.items()}, targets


def prev_bytes(targets):
    return torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], 1)


def run_gru(fn, x, names, backend):
    """fn(tensors) and the gradients of <fn, a fixed upstream> in `names` ([] for no backward)."""
    leaves = {n: t.clone().requires_grad_(n in names) for n, t in x.items()}
    out = fn(leaves, backend)
    if not names:
        return out.detach(), {}
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    (out * upstream).sum().backward()
    return out.detach(), {n: leaves[n].grad for n in names}


def check_gru(fn, x, names, nan_in):
    out, grads = run_gru(fn, x, names, "cpu")
    ref, ref_grads = run_gru(fn, x, names, "reference")
    assert_same_nonfinite("output", out, ref, nan_in)
    for n in names:
        assert_same_nonfinite(f"grad {n}", grads[n], ref_grads[n], nan_in)


def decode(targets):
    return lambda x, backend: gru_patch_decode(x["context"], prev_bytes(targets), *(x[n] for n in GRU_NAMES[1:6]),
                                               backend=backend)


def loss(targets, reduction):
    return lambda x, backend: gru_patch_loss(x["context"], targets, *(x[n] for n in GRU_NAMES[1:]),
                                             reduction=reduction, backend=backend)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("site", DECODE_SITES)
@pytest.mark.parametrize("M,P,h", GRU_SHAPES, ids=GRU_SHAPE_IDS)
def test_gru_patch_decode(M, P, h, site, value):
    skip_without_cpu_backend("gru_patch_decode")
    x, targets = gru_inputs(M, P, h, site, value)
    check_gru(decode(targets), x, GRU_NAMES[:6], value == "nan")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("site", GRU_SITES)
@pytest.mark.parametrize("M,P,h", GRU_SHAPES, ids=GRU_SHAPE_IDS)
def test_gru_patch_loss(M, P, h, site, value):
    """Per byte (no reduction), and the mean with its gradients (the CPU forward then takes the head's backward)."""
    skip_without_cpu_backend("gru_patch_loss")
    x, targets = gru_inputs(M, P, h, site, value)
    check_gru(loss(targets, "none"), x, [], value == "nan")
    check_gru(loss(targets, "mean"), x, GRU_NAMES, value == "nan")


def sample(x, backend, **kw):
    return gru_patch_sample(*(x[n] for n in GRU_NAMES), backend=backend, **kw)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("site", GRU_SITES)
@pytest.mark.parametrize("M,P,h", GRU_SHAPES, ids=GRU_SHAPE_IDS)
def test_gru_patch_sample(M, P, h, site, value):
    """The reference's bytes: greedy, seeded with top-k, and seeded with the first P - 1 bytes forced."""
    skip_without_cpu_backend("gru_patch_sample")
    x, targets = gru_inputs(M, P, h, site, value)
    prefix = targets[:, : P - 1]
    for kw in (dict(), dict(temperature=0.9, top_k=40), dict(temperature=1.0, prefix=prefix)):
        out = sample(x, "cpu", patch_size=P, generator=torch.Generator().manual_seed(5), **kw)
        ref = sample(x, "reference", patch_size=P, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(out, ref), f"{kw}: bytes {out[:3].tolist()}..., the reference's {ref[:3].tolist()}..."


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("site", ["weight_hh-z", "context"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_gru_patch_other_dtypes(dtype, site, value):
    skip_without_cpu_backend("gru_patch_decode")
    M, P, h = 3, 3, 20
    x, targets = gru_inputs(M, P, h, site, value, dtype)
    check_gru(decode(targets), x, GRU_NAMES[:6], value == "nan")
    check_gru(loss(targets, "none"), x, [], value == "nan")
    for kw in (dict(), dict(temperature=0.9)):
        out = sample(x, "cpu", patch_size=P, generator=torch.Generator().manual_seed(5), **kw)
        ref = sample(x, "reference", patch_size=P, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(out, ref), kw


# ---------------------------------------------------------------------------------------------
# Attention: linear (chunks of 64 tokens) and sliding-window (blocks of 64 queries)
# ---------------------------------------------------------------------------------------------

# [B, L, H, D, Dv]: two chunks/blocks, the second short; three, with Dv != D
ATTN_SHAPES = [(1, 70, 2, 8, 8), (2, 130, 1, 16, 12)]
ATTN_SHAPE_IDS = [f"B{B}-L{L}-H{H}-D{D}-Dv{Dv}" for B, L, H, D, Dv in ATTN_SHAPES]
POSITIONS = [5, 66]  # a token early in the first chunk (the rows before it must stay finite), one in the second


def qkv(B, L, H, D, Dv, name, pos, value):
    g = torch.Generator().manual_seed(L * 13 + D)
    t = {"q": torch.randn(B, L, H, D, generator=g), "k": torch.randn(B, L, H, D, generator=g),
         "v": torch.randn(B, L, H, Dv, generator=g)}
    t[name][0, pos, 0, 3] = VALUES[value]
    return t


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", "qkv")
@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("feature_map,normalize", [("elu+1", True), ("identity", True), ("elu+1", False)],
                         ids=["elu+1", "identity", "elu+1-unnormalized"])
@pytest.mark.parametrize("B,L,H,D,Dv", ATTN_SHAPES, ids=ATTN_SHAPE_IDS)
def test_linear_attention(B, L, H, D, Dv, feature_map, normalize, pos, name, value):
    skip_without_cpu_backend("linear_attention")
    t = qkv(B, L, H, D, Dv, name, pos, value)
    kw = dict(feature_map=feature_map, feature_eps=1e-4, scale=D**-0.5, eps=1e-4, normalize=normalize)
    out, (S, z) = linear_attention(t["q"], t["k"], t["v"], output_final_state=True, backend="cpu", **kw)
    ref, (S_ref, z_ref) = LR.naive_linear_attention(t["q"], t["k"], t["v"], initial_state=None,
                                                    output_final_state=True, cu_seqlens=None, **kw)
    for what, a, b in (("o", out, ref), ("S", S, S_ref), ("z", z, z_ref)):
        assert_same_nonfinite(what, a, b, value == "nan")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", "qkv")
def test_linear_attention_segments(name, value):
    """A non-finite value in one cu_seqlens segment stays out of the others."""
    skip_without_cpu_backend("linear_attention")
    t = qkv(1, 150, 2, 8, 8, name, 40, value)
    cu = torch.tensor([0, 45, 110, 150], dtype=torch.int32)
    kw = dict(feature_map="elu+1", feature_eps=1e-4, scale=8**-0.5, eps=1e-4, normalize=True)
    out = linear_attention(t["q"], t["k"], t["v"], cu_seqlens=cu, backend="cpu", **kw)
    ref = LR.naive_linear_attention(t["q"], t["k"], t["v"], initial_state=None, output_final_state=False,
                                    cu_seqlens=cu, **kw)
    assert_same_nonfinite("o", out, ref, value == "nan")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", "qkv")
def test_linear_attention_step(name, value):
    skip_without_cpu_backend("linear_attention_step")
    B, H, D, Dv = 2, 3, 8, 12
    g = torch.Generator().manual_seed(3)
    t = {"q": torch.randn(B, H, D, generator=g), "k": torch.randn(B, H, D, generator=g),
         "v": torch.randn(B, H, Dv, generator=g)}
    t[name][1, 2, 3] = VALUES[value]
    state = (torch.rand(B, H, D, Dv, generator=g), torch.rand(B, H, D, generator=g) + 1)
    outs = {}
    for backend in ("cpu", "reference"):  # the reference step is the naive one: one token, no blocks
        S, z = (s.clone() for s in state)
        outs[backend] = (linear_attention_step(t["q"], t["k"], t["v"], (S, z), backend=backend), S, z)
    for what, a, b in zip(("o", "S", "z"), outs["cpu"], outs["reference"]):
        assert_same_nonfinite(what, a, b, value == "nan")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", "qkv")
@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("window", [1, 4, 40, 100])  # 100: plain causal for L = 70
@pytest.mark.parametrize("B,L,H,D,Dv", ATTN_SHAPES, ids=ATTN_SHAPE_IDS)
def test_sliding_window_attention(B, L, H, D, Dv, window, pos, name, value):
    skip_without_cpu_backend("sliding_window_attention")
    t = qkv(B, L, H, D, Dv, name, pos, value)
    out = sliding_window_attention(t["q"], t["k"], t["v"], window, backend="cpu")
    ref = SR.naive_sliding_window_attention(t["q"], t["k"], t["v"], window)
    assert_same_nonfinite("o", out, ref, value == "nan")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", "qkv")
def test_sliding_window_attention_segments(name, value):
    skip_without_cpu_backend("sliding_window_attention")
    t = qkv(1, 150, 2, 8, 8, name, 40, value)
    cu = torch.tensor([0, 45, 110, 150], dtype=torch.int32)
    out = sliding_window_attention(t["q"], t["k"], t["v"], 30, cu_seqlens=cu, backend="cpu")
    ref = SR.naive_sliding_window_attention(t["q"], t["k"], t["v"], 30, cu_seqlens=cu)
    assert_same_nonfinite("o", out, ref, value == "nan")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", ["q", "k", "v", "unfilled-slot"])
def test_sliding_window_attention_step(name, value):
    """The new token's q, k or v; or a slot of the cache not filled yet (pos < W - 1), which no query reads."""
    skip_without_cpu_backend("sliding_window_attention_step")
    B, W, H, D, Dv = 2, 8, 3, 8, 12
    g = torch.Generator().manual_seed(4)
    t = {"q": torch.randn(B, H, D, generator=g), "k": torch.randn(B, H, D, generator=g),
         "v": torch.randn(B, H, Dv, generator=g)}
    k_cache, v_cache = torch.randn(B, W, H, D, generator=g), torch.randn(B, W, H, Dv, generator=g)
    pos = torch.tensor([3, 11])
    if name == "unfilled-slot":
        k_cache[0, 6, 1, 2] = VALUES[value]
        v_cache[0, 6, 1, 2] = VALUES[value]
    else:
        t[name][0, 1, 2] = VALUES[value]
    out = sliding_window_attention_step(t["q"], t["k"], t["v"], k_cache.clone(), v_cache.clone(), pos,
                                        backend="cpu")
    ref = SR.naive_sliding_window_attention_step(t["q"], t["k"], t["v"], k_cache.clone(), v_cache.clone(), pos)
    assert_same_nonfinite("o", out, ref, value == "nan")
