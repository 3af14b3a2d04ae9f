"""vq_nearest and vq_ema_update (docs/ops.md §1.6): every backend against the float64 oracle.

The Triton backend's interpreter tests live in test_segment_ops_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from agiformer_kernels import BackendError, backends, vq_ema_update, vq_nearest
from agiformer_kernels.ops.vq_nearest.reference import naive_vq_ema_update, naive_vq_nearest
from tests.utils import assert_close


def make_inputs(N, K, D, dtype):
    g = torch.Generator().manual_seed(N * 10 + K + D)
    z = torch.randn(N, D, generator=g, dtype=torch.float64)
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64)
    return z.to(dtype), codebook.to(dtype)


def assert_nearest(z, codebook, index, dist):
    """index is the oracle's, except where (fp32 and below) the oracle's distances to the two codes lie within
    rounding of each other; dist is the exact distance to the chosen code."""
    zd, cd = z.double(), codebook.double()
    ref_i, ref_d = naive_vq_nearest(zd, cd)
    assert index.dtype == torch.int64 and index.shape == ref_i.shape
    chosen = (zd - cd[index]).square().sum(-1)
    if z.dtype == torch.float64:
        assert torch.equal(index, ref_i), f"{int((index != ref_i).sum())} of {index.numel()} indices differ"
    else:
        slack = 1e-5 * (zd.square().sum(-1) + cd[index].square().sum(-1))
        bad = chosen > ref_d + slack
        assert not bool(bad.any()), f"{int(bad.sum())} rows chose a code farther than the nearest"
        assert float((index == ref_i).double().mean()) > 0.99
    assert_close("sqdist", dist, chosen)


SHAPES = [(1, 1, 8), (63, 77, 24), (65, 129, 64), (1000, 300, 16), (200, 1000, 3), (64, 5, 256)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in SHAPES])
def test_matches_oracle(backend, dtype, N, K, D):
    z, codebook = make_inputs(N, K, D, dtype)
    index, dist = vq_nearest(z, codebook, backend=backend)
    assert dist.dtype == dtype
    assert_nearest(z, codebook, index, dist)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_go_to_the_lowest_index(backend, dtype):
    """Codes 3, 40 and 200 equal (other lanes, other code tiles of the kernels): every vector nearest to them
    takes 3, as torch.argmin does."""
    z, codebook = make_inputs(50, 300, 16, dtype)
    codebook[40] = codebook[3]
    codebook[200] = codebook[3]
    z[::2] = codebook[3] + 0.01
    index, _ = vq_nearest(z, codebook, backend=backend)
    assert bool((index[::2] == 3).all())
    exact = torch.cdist(z.double(), codebook.double()).square().argmin(-1)
    assert torch.equal(index[::2], exact[::2])


def test_reference_low_precision():
    z, codebook = make_inputs(65, 77, 32, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        index, dist = vq_nearest(z.to(dtype), codebook.to(dtype))
        assert dist.dtype == torch.float32
        assert_nearest(z.to(dtype), codebook.to(dtype), index, dist)


def test_cpu_declines_half_precision_and_auto_falls_back():
    z, codebook = make_inputs(4, 3, 8, torch.bfloat16)
    with pytest.raises(BackendError, match="float32 or float64"):
        vq_nearest(z, codebook, backend="cpu")
    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="cpu"):
        vq_nearest(z, codebook)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,K,D", [(1, 1, 4), (1000, 77, 24), (65, 300, 3)])
def test_ema_update_matches_oracle(backend, dtype, N, K, D):
    z, _ = make_inputs(N, K, D, dtype)
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, K, (N,), generator=g)
    index[: min(N, 3)] = K - 1
    counts = torch.rand(K, generator=g, dtype=torch.float64).to(dtype)
    counts[0] = 0.0  # a dead code: Laplace smoothing keeps it finite
    sums = torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype)
    c_ref, s_ref = counts.double().clone(), sums.double().clone()
    ref = naive_vq_ema_update(z.double(), index, c_ref, s_ref, decay=0.9, eps=1e-5)
    codebook = vq_ema_update(z, index.int() if N > 1 else index, counts, sums, decay=0.9, eps=1e-5, backend=backend)
    assert codebook.dtype == dtype and codebook.shape == (K, D)
    assert_close("counts (in place)", counts, c_ref)
    assert_close("sums (in place)", sums, s_ref)
    assert_close("codebook", codebook, ref)
    assert bool(torch.isfinite(codebook).all())


def test_cpu_ops_pass_opcheck_and_compile():
    z, codebook = make_inputs(70, 33, 16, torch.float32)
    vq_nearest(z, codebook, backend="cpu")  # loads the library and its fakes
    ops = torch.ops.agiformer_kernels
    torch.library.opcheck(ops.vq_nearest_fwd, (z, codebook))
    index = torch.randint(0, 33, (70,))
    torch.library.opcheck(ops.vq_ema_update, (z, index, torch.rand(33), torch.randn(33, 16), 0.9, 1e-5))

    def fn(z, codebook):
        return vq_nearest(z, codebook, backend="cpu")

    eager = fn(z, codebook)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(z, codebook)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def _bad_calls():
    z, cb = torch.randn(5, 8), torch.randn(3, 8)
    counts, sums, index = torch.zeros(3), torch.zeros(3, 8), torch.tensor([0, 1, 2, 0, 1])
    return [
        (lambda: vq_nearest(z[0], cb), ValueError, "z must have 2"),
        (lambda: vq_nearest(z, cb[:, :4]), ValueError, "codebook must have shape"),
        (lambda: vq_nearest(z, cb[:0]), ValueError, "codebook must hold"),
        (lambda: vq_nearest(z, cb.double()), ValueError, "codebook has dtype"),
        (lambda: vq_nearest(z.long(), cb), TypeError, "z must be float"),
        (lambda: vq_ema_update(z, index, counts, sums, decay=1.5), ValueError, "decay"),
        (lambda: vq_ema_update(z, index, counts, sums, decay=0.9, eps=0.0), ValueError, "eps"),
        (lambda: vq_ema_update(z, index + 1, counts, sums, decay=0.9), ValueError, "index must lie"),
        (lambda: vq_ema_update(z, index[:3], counts, sums, decay=0.9), ValueError, "index must have shape"),
        (lambda: vq_ema_update(z, index.float(), counts, sums, decay=0.9), TypeError, "index must be an integer"),
        (lambda: vq_ema_update(z, index, counts.half(), sums.half(), decay=0.9), TypeError, "counts must be float32"),
        (lambda: vq_ema_update(z, index, counts, sums[:, :4], decay=0.9), ValueError, "sums must have shape"),
        (lambda: vq_ema_update(z, index, counts, sums.double(), decay=0.9), ValueError, "sums has dtype"),
        (lambda: vq_nearest(z, cb, backend="nope"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("i", range(14))
def test_bad_inputs_raise_naming_the_argument(i):
    call, error, match = _bad_calls()[i]
    with pytest.raises(error, match=match):
        call()
