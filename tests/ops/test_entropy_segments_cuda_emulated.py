"""The CUDA kernels of entropy_segments (csrc/entropy_segments/entropy_segments.cu), run on the CPU.

The source runs under the emulated CUDA runtime of tests/cuda_emulation.py (what that checks and what it
cannot, the GPU's own expf/logf among them, is said there): here the warp-per-row online log-sum-exp, its
shuffle merge, masked (-inf) logits and the boundary rules with cu_seqlens and max_len meet the float64
oracle and the rules written out as a loop. The gpu-marked tests at the end run the real backend.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from agiformer_kernels import entropy_segments
from agiformer_kernels.ops.entropy_segments._common import (
    kernel_options,
    sequence_start,
)
from agiformer_kernels.ops.entropy_segments.reference import naive_entropy, naive_starts
from tests.cuda_emulation import CSRC, for_gcc, load, ptr
from tests.ops.test_entropy_segments import (
    OPTIONS,
    _opt_id,
    _uniform_logits,
    make_logits,
)
from tests.utils import assert_close

SOURCE = CSRC / "entropy_segments" / "entropy_segments.cu"

ENTRY_POINTS = r"""
#include "kernels.cu"
using namespace agf_entropy;
extern "C" {
int emu_entropy_segments(int dt, const void* logits, int64_t row_stride, const int32_t* seq_start, float* entropy,
                         bool* starts, int B, int L, int V, int rule, float threshold, float delta, int64_t max_len) {
  Params p{logits, row_stride, seq_start, entropy, starts, B, L, V, rule, threshold, delta, max_len};
  return entropy_segments(p, DType(dt), nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def run_kernels(kernels, x, rule="delta", threshold=None, delta=0.0, max_len=None, cu_seqlens=None):
    """(entropy, starts) from the emulated kernels; x [B, L, V] with a contiguous last dimension and rows
    at one stride."""
    B, L, V = x.shape
    assert x.stride(2) == 1 and x.stride(0) == L * x.stride(1)
    rule_code, thr, dlt, ml = kernel_options(rule, threshold, delta, max_len)
    seq_start = sequence_start(cu_seqlens, L, x.device)
    entropy = torch.full((B, L), float("nan"))
    starts = torch.zeros(B, L, dtype=torch.bool)
    # int64_t arguments as c_int64: ctypes passes a plain int as a 32-bit C int
    assert kernels.emu_entropy_segments(DTYPE_CODE[x.dtype], ptr(x), ctypes.c_int64(x.stride(1)), ptr(seq_start),
                                        ptr(entropy), ptr(starts), B, L, V, rule_code, ctypes.c_float(thr),
                                        ctypes.c_float(dlt), ctypes.c_int64(ml)) == 0
    return entropy, starts


CASES = [  # (dtype, B, L, V, masked)
    (torch.float32, 2, 1, 256, False),
    (torch.float32, 2, 63, 256, True),
    (torch.float32, 1, 65, 257, False),
    (torch.float32, 1, 7, 1, False),
    (torch.float32, 3, 9, 20, True),  # V < 32: idle lanes merge empty states
    (torch.bfloat16, 2, 40, 1000, False),
    (torch.float16, 1, 33, 100, True),
]


@pytest.mark.parametrize("dtype,B,L,V,masked", CASES, ids=[f"B{b}-L{l}-V{v}-{'masked-' if m else ''}{str(t)[6:]}"
                                                            for t, b, l, v, m in CASES])
def test_entropy_emulated_matches_oracle(kernels, dtype, B, L, V, masked):
    x = make_logits(B, L, V, dtype, masked)
    entropy, _ = run_kernels(kernels, x)
    if V == 1:  # H = 0 exactly: nothing relative to compare against
        assert float(entropy.abs().max()) == 0.0
        return
    assert_close("entropy", entropy, naive_entropy(x.double()))  # fp32 accumulation from the rounded logits


def test_strided_rows(kernels):
    """Rows of a wider buffer (a slice of the vocabulary dimension): the kernel walks them at their stride."""
    wide = make_logits(2, 30, 300, torch.float32)
    x = wide[..., :259]
    entropy, _ = run_kernels(kernels, x)
    assert_close("entropy", entropy, naive_entropy(x.double()))


@pytest.mark.parametrize("options", OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("cu", [None, (0, 1, 2, 40, 40, 100)], ids=["dense", "cu_seqlens"])
def test_starts_follow_the_rule(kernels, options, cu):
    """starts equal the loop written from the rules' words, run on the entropies the kernel returned."""
    rule, threshold, delta, max_len = options
    B = 1 if cu else 2
    x = make_logits(B, 100, 256, torch.float32)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    entropy, starts = run_kernels(kernels, x, rule, threshold, delta, max_len, cu_t)
    expected = naive_starts(entropy, rule=rule, threshold=threshold, delta=delta, max_len=max_len, cu_seqlens=cu_t)
    assert torch.equal(starts, expected), (starts.int(), expected.int())


def test_rules_differ_by_one_position(kernels):
    x = _uniform_logits([2, 2, 2, 2, 40, 2, 2, 2])
    entropy, s_delta = run_kernels(kernels, x, "delta", None, 0.5)
    assert_close("entropy", entropy, torch.tensor([[math.log(n) for n in [2, 2, 2, 2, 40, 2, 2, 2]]]), tol=1e-6)
    _, s_global = run_kernels(kernels, x, "global", 1.0, None)
    assert s_delta[0].nonzero().flatten().tolist() == [0, 4]
    assert s_global[0].nonzero().flatten().tolist() == [0, 1, 5]


def test_emulation_sees_every_launch():
    assert for_gcc(SOURCE.read_text()).count("emu_launch(") == 2  # entropy, starts


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,V,masked", [(2, 1, 256, False), (2, 63, 256, True), (2, 1000, 257, False)],
                         ids=lambda x: str(x))
def test_cuda_backend_matches_oracle(dtype, B, L, V, masked):
    x = make_logits(B, L, V, dtype, masked)
    entropy, starts = entropy_segments(x.cuda(), rule="delta", threshold=None, delta=0.0, backend="cuda")
    assert entropy.dtype == torch.float32 and starts.dtype == torch.bool
    assert_close("entropy", entropy.cpu(), naive_entropy(x.double()))


@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("cu", [None, (0, 1, 2, 40, 40, 100)], ids=["dense", "cu_seqlens"])
def test_cuda_starts_follow_the_rule(options, cu):
    rule, threshold, delta, max_len = options
    B = 1 if cu else 2
    x = make_logits(B, 100, 256, torch.float32).cuda()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    entropy, starts = entropy_segments(x, rule=rule, threshold=threshold, delta=delta, max_len=max_len,
                                       cu_seqlens=cu_t, backend="cuda")
    expected = naive_starts(entropy.cpu(), rule=rule, threshold=threshold, delta=delta, max_len=max_len,
                            cu_seqlens=None if cu_t is None else cu_t.cpu())
    assert torch.equal(starts.cpu(), expected)


@pytest.mark.gpu
def test_cuda_op_passes_opcheck():
    x = make_logits(2, 17, 64, torch.float32).cuda()
    entropy_segments(x, rule="delta", threshold=None, delta=0.1, backend="cuda")  # loads the library and its fake
    seq_start = torch.zeros(17, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.agiformer_kernels.entropy_segments_fwd, (x, seq_start, 0, float("inf"), 0.1, 3))
