"""The CUDA kernels of vq_nearest and vq_ema_update (csrc/vq_nearest/vq_nearest.cu), run on the CPU.

The source runs under the emulated CUDA runtime of tests/cuda_emulation.py (what that checks and what it
cannot is said there): here the code and feature tiling, padding past K and D, the half-warp argmin merge
(ties to the lowest index) and the EMA update over rows sorted by code meet the float64 oracle. The
gpu-marked tests at the end run the real backend.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from agiformer_kernels import vq_ema_update, vq_nearest
from agiformer_kernels.ops.vq_nearest.reference import naive_vq_ema_update
from tests.cuda_emulation import CSRC, for_gcc, load, ptr
from tests.ops.test_vq_nearest import assert_nearest, make_inputs
from tests.utils import assert_close

SOURCE = CSRC / "vq_nearest" / "vq_nearest.cu"

ENTRY_POINTS = r"""
#include "kernels.cu"
using namespace agf_vq;
extern "C" {
int emu_nearest(int dt, const void* z, const void* codebook, float* code_norm, int64_t* index, float* dist, int N,
                int K, int D) {
  NearestParams p{z, codebook, code_norm, index, dist, N, K, D};
  return nearest(p, DType(dt), nullptr);
}
int emu_ema(int dt, const void* z, const int64_t* order, const int64_t* code_start, void* counts, void* sums,
            void* total, void* codebook, int K, int D, double decay, double eps) {
  EmaParams p{z, order, code_start, counts, sums, total, codebook, K, D, decay, eps};
  return ema_update(p, EmaDType(dt), nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EMA_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def run_nearest(kernels, z, codebook):
    (N, D), K = z.shape, codebook.shape[0]
    index = torch.full((N,), -1, dtype=torch.int64)
    dist, norm = torch.full((N,), float("nan")), torch.full((K,), float("nan"))
    assert kernels.emu_nearest(DTYPE_CODE[z.dtype], ptr(z), ptr(codebook), ptr(norm), ptr(index), ptr(dist), N, K,
                               D) == 0
    return index, dist


SHAPES = [  # (dtype, N, K, D): K and D off every tile (64 codes, 32 features), N off the 64 rows
    (torch.float32, 1, 1, 8),
    (torch.float32, 63, 77, 24),
    (torch.float32, 65, 129, 64),
    (torch.float32, 200, 300, 3),
    (torch.float32, 64, 5, 256),
    (torch.float16, 65, 129, 40),
    (torch.bfloat16, 63, 77, 24),
]


@pytest.mark.parametrize("dtype,N,K,D", SHAPES, ids=[f"N{n}-K{k}-D{d}-{str(t)[6:]}" for t, n, k, d in SHAPES])
def test_nearest_emulated_matches_oracle(kernels, dtype, N, K, D):
    z, codebook = make_inputs(N, K, D, dtype)
    index, dist = run_nearest(kernels, z, codebook)
    assert_nearest(z, codebook, index, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lowest_index(kernels, dtype):
    """Codes 3, 40, 70 and 200 equal (one thread, another thread, other code tiles): every vector nearest to them
    takes 3, as torch.argmin does."""
    z, codebook = make_inputs(50, 300, 16, dtype)
    for k in (40, 70, 200):
        codebook[k] = codebook[3]
    z[::2] = codebook[3] + 0.01
    index, _ = run_nearest(kernels, z, codebook)
    assert bool((index[::2] == 3).all())


def test_nonfinite_rows_take_code_zero(kernels):
    """A row with no finite score (a NaN or inf in z) takes code 0, as the CPU kernel; other rows are unharmed."""
    z, codebook = make_inputs(70, 20, 8, torch.float32)
    z[5, 2], z[66, 0] = float("nan"), float("inf")
    index, dist = run_nearest(kernels, z, codebook)
    assert index[5] == 0 and index[66] == 0 and dist[5].isnan() and dist[66].isinf()
    keep = torch.ones(70, dtype=torch.bool)
    keep[[5, 66]] = False
    assert_nearest(z[keep], codebook, index[keep], dist[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,K,D", [(1, 1, 4), (1000, 77, 24), (65, 300, 130)])
def test_ema_update_emulated_matches_oracle(kernels, dtype, N, K, D):
    z, _ = make_inputs(N, K, D, dtype)
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, K, (N,), generator=g)
    index[: min(N, 3)] = K - 1
    counts = torch.rand(K, generator=g, dtype=torch.float64).to(dtype)
    counts[0] = 0.0  # a dead code: Laplace smoothing keeps it finite
    sums = torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype)
    c_ref, s_ref = counts.double().clone(), sums.double().clone()
    ref = naive_vq_ema_update(z.double(), index, c_ref, s_ref, decay=0.9, eps=1e-5)
    # what the binding does before the kernels: rows grouped by code (stable), each code's first row
    order = index.sort(stable=True).indices
    code_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(index, minlength=K).cumsum(0)])
    total, codebook = torch.full((1,), float("nan"), dtype=dtype), torch.full((K, D), float("nan"), dtype=dtype)
    assert kernels.emu_ema(EMA_DTYPE_CODE[dtype], ptr(z), ptr(order), ptr(code_start), ptr(counts), ptr(sums),
                           ptr(total), ptr(codebook), K, D, ctypes.c_double(0.9), ctypes.c_double(1e-5)) == 0
    assert_close("counts (in place)", counts, c_ref)
    assert_close("sums (in place)", sums, s_ref)
    assert_close("codebook", codebook, ref)


def test_emulation_sees_every_launch():
    assert for_gcc(SOURCE.read_text()).count("emu_launch(") == 5  # norms, nearest, counts, total, sums


GPU_SHAPES = [(dt, N, K, D) for dt in (torch.float32, torch.float16, torch.bfloat16)
              for N, K, D in [(1, 1, 8), (1000, 300, 16), (65, 129, 64), (4099, 1000, 256)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,N,K,D", GPU_SHAPES, ids=[f"N{n}-K{k}-D{d}-{str(t)[6:]}" for t, n, k, d in GPU_SHAPES])
def test_cuda_backend_matches_oracle(dtype, N, K, D):
    z, codebook = make_inputs(N, K, D, dtype)
    index, dist = vq_nearest(z.cuda(), codebook.cuda(), backend="cuda")
    assert dist.dtype == torch.float32
    assert_nearest(z, codebook, index.cpu(), dist.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_ema_update_matches_oracle(dtype):
    N, K, D = 1000, 77, 24
    z, _ = make_inputs(N, K, D, dtype)
    index = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(1))
    counts = torch.rand(K, dtype=torch.float64).to(dtype)
    sums = torch.randn(K, D, dtype=torch.float64).to(dtype)
    c_ref, s_ref = counts.double().clone(), sums.double().clone()
    ref = naive_vq_ema_update(z.double(), index, c_ref, s_ref, decay=0.9, eps=1e-5)
    counts, sums = counts.cuda(), sums.cuda()
    codebook = vq_ema_update(z.cuda(), index.cuda(), counts, sums, decay=0.9, eps=1e-5, backend="cuda")
    assert_close("counts (in place)", counts.cpu(), c_ref)
    assert_close("sums (in place)", sums.cpu(), s_ref)
    assert_close("codebook", codebook.cpu(), ref)


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck():
    z, codebook = make_inputs(70, 33, 16, torch.float32)
    z, codebook = z.cuda(), codebook.cuda()
    vq_nearest(z, codebook, backend="cuda")  # loads the library and its fakes
    ops = torch.ops.agiformer_kernels
    torch.library.opcheck(ops.vq_nearest_fwd, (z, codebook))
    index = torch.randint(0, 33, (70,), device="cuda")
    torch.library.opcheck(ops.vq_ema_update, (z, index, torch.rand(33, device="cuda"),
                                              torch.randn(33, 16, device="cuda"), 0.9, 1e-5))
