"""entropy_segments and segment_offsets (docs/ops.md §1.4): every backend against the float64 oracle and
the rules written out as a loop (reference.naive_starts).

The Triton backend's interpreter tests live in test_segment_ops_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from agiformer_kernels import BackendError, backends, entropy_segments, segment_offsets
from agiformer_kernels.ops.entropy_segments.reference import naive_entropy, naive_segment_offsets, naive_starts
from tests.utils import assert_close

BACKENDS = ["reference", "cpu"]


def make_logits(B, L, V, dtype, masked=False):
    g = torch.Generator().manual_seed(L * 1000 + V)
    x = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2.5
    if masked:  # some vocabulary entries masked out with -inf: p = 0 adds nothing
        x[..., ::7] = float("-inf")
    return x.to(dtype)


OPTIONS = [  # (rule, threshold, delta, max_len)
    ("delta", None, 0.1, None),
    ("delta", 4.5, 0.3, None),
    ("delta", None, -0.05, 3),
    ("global", 4.6, None, None),
    ("global", 4.4, None, 2),
    ("global", 100.0, None, 1),  # max_len 1: every position starts
]


def _opt_id(o):
    rule, thr, delta, m = o
    return f"{rule}-t{thr}-d{delta}-m{m}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,L,V,masked", [(2, 1, 256, False), (2, 63, 256, True), (1, 65, 257, False),
                                           (2, 1000, 256, False), (1, 7, 1, False)],
                         ids=lambda x: str(x))
def test_entropy_matches_oracle(backend, dtype, B, L, V, masked):
    x = make_logits(B, L, V, dtype, masked)
    entropy, starts = entropy_segments(x, rule="delta", threshold=None, delta=0.0, backend=backend)
    assert entropy.dtype == dtype and starts.dtype == torch.bool and starts.shape == (B, L)
    ref = naive_entropy(x.double())
    if V == 1:  # H = 0 exactly: nothing relative to compare against
        assert float(entropy.abs().max()) == 0.0
        return
    assert_close("entropy", entropy, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("cu", [None, (0, 1, 2, 40, 40, 100)], ids=["dense", "cu_seqlens"])
def test_starts_follow_the_rule(backend, options, cu):
    """starts equal the loop written from the rules' words, run on the entropies the backend returned."""
    rule, threshold, delta, max_len = options
    B = 1 if cu else 2
    x = make_logits(B, 100, 256, torch.float32)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    entropy, starts = entropy_segments(x, rule=rule, threshold=threshold, delta=delta, max_len=max_len,
                                       cu_seqlens=cu_t, backend=backend)
    expected = naive_starts(entropy, rule=rule, threshold=threshold, delta=delta, max_len=max_len, cu_seqlens=cu_t)
    assert torch.equal(starts, expected), (starts.int(), expected.int())
    assert 0 < int(starts.sum()) < starts.numel() or max_len == 1 or B * 100 == int(starts.sum())


def _uniform_logits(support: list[int], V=64):
    """One row of logits per position, uniform over its first n entries (-inf elsewhere): H = log n exactly."""
    x = torch.full((1, len(support), V), float("-inf"))
    for t, n in enumerate(support):
        x[0, t, :n] = 0.0
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_differ_by_one_position(backend):
    """One entropy spike at t = 4: the delta rule cuts at 4 (the prediction made there jumps), the global rule at
    5 (the byte whose prediction was uncertain)."""
    x = _uniform_logits([2, 2, 2, 2, 40, 2, 2, 2])
    entropy, s_delta = entropy_segments(x, rule="delta", threshold=None, delta=0.5, backend=backend)
    assert_close("entropy", entropy, torch.tensor([[math.log(n) for n in [2, 2, 2, 2, 40, 2, 2, 2]]]), tol=1e-6)
    _, s_global = entropy_segments(x, rule="global", threshold=1.0, backend=backend)
    assert s_delta[0].nonzero().flatten().tolist() == [0, 4]
    assert s_global[0].nonzero().flatten().tolist() == [0, 1, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_len_cuts_long_runs(backend):
    x = _uniform_logits([3] * 11)
    _, starts = entropy_segments(x, rule="delta", threshold=None, delta=1.0, max_len=4, backend=backend)
    assert starts[0].nonzero().flatten().tolist() == [0, 4, 8]
    offsets = segment_offsets(starts)
    assert offsets.tolist() == [0, 4, 8, 11]


def test_low_precision_reference():
    x = make_logits(2, 65, 256, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        entropy, _ = entropy_segments(x.to(dtype), rule="global", threshold=5.0)
        assert entropy.dtype == torch.float32
        assert_close(f"entropy {dtype}", entropy, naive_entropy(x.to(dtype).double()), tol=1e-5)


def test_cpu_declines_half_precision_and_auto_falls_back():
    x = make_logits(1, 5, 16, torch.bfloat16)
    with pytest.raises(BackendError, match="float32 or float64"):
        entropy_segments(x, rule="global", threshold=1.0, backend="cpu")
    backends._warned.clear()  # one warning per reason and process: another test may have had it
    with pytest.warns(RuntimeWarning, match="cpu"):
        entropy_segments(x, rule="global", threshold=1.0)


@pytest.mark.parametrize("B,L", [(1, 1), (3, 1), (2, 63), (3, 65)])
def test_segment_offsets_match_naive(B, L):
    starts = torch.rand(B, L, generator=torch.Generator().manual_seed(L)) < 0.3
    starts[0, 0] = False  # a row that does not mark its first position still starts a segment there
    offsets = segment_offsets(starts)
    assert offsets.dtype == torch.int32
    assert torch.equal(offsets, naive_segment_offsets(starts))
    assert int(offsets[0]) == 0 and int(offsets[-1]) == B * L
    row_starts = torch.arange(B, dtype=torch.int32) * L  # segments never cross rows
    assert bool(torch.isin(row_starts, offsets).all())


def test_cpu_op_passes_opcheck_and_compiles():
    x = make_logits(2, 30, 40, torch.float32)
    entropy_segments(x, rule="global", threshold=3.0, backend="cpu")  # loads the library and its fake kernel
    seq_start = torch.zeros(30, dtype=torch.int32)
    torch.library.opcheck(torch.ops.agiformer_kernels.entropy_segments_fwd, (x, seq_start, 0, 3.5, 0.1, 4))

    def fn(x):
        return entropy_segments(x, rule="delta", threshold=3.5, delta=0.1, max_len=4, backend="cpu")

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def _bad_calls():
    x = torch.randn(1, 8, 16)
    return [
        (lambda: entropy_segments(x[0], rule="delta", threshold=None, delta=0.1), ValueError, "logits must have 3"),
        (lambda: entropy_segments(x.long(), rule="delta", threshold=None, delta=0.1), TypeError, "logits must be"),
        (lambda: entropy_segments(x, rule="nope", threshold=None, delta=0.1), ValueError, "rule must be"),
        (lambda: entropy_segments(x, rule="global", threshold=None), ValueError, "threshold is required"),
        (lambda: entropy_segments(x, rule="global", threshold=1.0, delta=0.1), ValueError, "delta applies"),
        (lambda: entropy_segments(x, rule="delta", threshold=None), ValueError, "delta is required"),
        (lambda: entropy_segments(x, rule="delta", threshold="a", delta=0.1), TypeError, "threshold must be"),
        (lambda: entropy_segments(x, rule="delta", threshold=None, delta=0.1, max_len=0), ValueError, "max_len"),
        (lambda: entropy_segments(x, rule="delta", threshold=None, delta=0.1, max_len=2.0), TypeError, "max_len"),
        (lambda: entropy_segments(x, rule="delta", threshold=None, delta=0.1, cu_seqlens=torch.tensor([0, 5])),
         ValueError, "cu_seqlens"),
        (lambda: entropy_segments(x.expand(2, -1, -1), rule="delta", threshold=None, delta=0.1,
                                  cu_seqlens=torch.tensor([0, 8])), ValueError, "logits must have B = 1"),
        (lambda: entropy_segments(x, rule="delta", threshold=None, delta=0.1, backend="nope"), ValueError, "backend"),
        (lambda: segment_offsets(torch.ones(2, 3)), TypeError, "starts must be a bool"),
        (lambda: segment_offsets(torch.ones(3, dtype=torch.bool)), ValueError, "starts must have 2"),
        (lambda: segment_offsets(torch.ones(3, 0, dtype=torch.bool)), ValueError, "starts must hold"),
    ]


@pytest.mark.parametrize("i", range(15))
def test_bad_inputs_raise_naming_the_argument(i):
    call, error, match = _bad_calls()[i]
    with pytest.raises(error, match=match):
        call()
