"""linear_attention (docs/ops.md §1.1) and its decode step: reference and C++ CPU backends against the float64 oracle.

The Triton backend's tests live in test_linear_attention_triton.py (the interpreter on CPU, slow), and
so do the GPU tests of the Triton and CUDA backends; the CUDA kernels' emulated runs on CPU in
test_linear_attention_cuda_emulated.py.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch

from agiformer_kernels import BackendError, linear_attention, linear_attention_step
from agiformer_kernels.ops.linear_attention import cpp
from agiformer_kernels.ops.linear_attention.reference import naive_linear_attention
from tests.utils import TOLERANCE, assert_close, assert_low_precision_close, rel_rms

BACKENDS = ["reference", "cpu"]


@contextlib.contextmanager
def one_thread():
    """The oracle's loop over tokens and gradcheck are many tiny ops: OpenMP hand-offs only slow them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_inputs(B, L, H, D, dtype, Dv=None, n_state=None, seed=0):
    """q, k, v [B, L, H, D] (+ a state for n_state sequences), drawn in float64 from a generator seeded by
    the shape, then cast: the same shape in another dtype holds the same values up to rounding."""
    g = torch.Generator().manual_seed(seed + L * 1000 + D * 10 + H)
    Dv = Dv or D
    q, k = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, L, H, Dv, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if n_state is None:
        return q, k, v, None
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = torch.randn(n_state, H, D, Dv, generator=g, dtype=torch.float64).to(state_dtype)
    z0 = torch.rand(n_state, H, D, generator=g, dtype=torch.float64).to(state_dtype) * L
    return q, k, v, (S0, z0)


def offsets_for(L):
    """Segment offsets with an empty segment and segments that straddle chunk boundaries."""
    return sorted({0, L // 3, L // 3, (2 * L) // 3, L}) if L > 2 else [0, L]


OPTIONS = {
    "default": dict(),
    "identity-unnormalized": dict(feature_map="identity", normalize=False),
    "scale0.5-eps1e-2": dict(scale=0.5, eps=1e-2, feature_eps=1e-3),
}


@functools.lru_cache(maxsize=None)
def _oracle(B, L, H, D, Dv, state, packed, options):
    """Naive float64 output, final state and input gradients for the inputs make_inputs gives."""
    offsets = offsets_for(L) if packed else None
    n = len(offsets) - 1 if packed else B
    q, k, v, init = make_inputs(B, L, H, D, torch.float64, Dv, n if state else None)
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([t.requires_grad_() for t in init] if state else [])
    opts = dict(feature_map="elu+1", feature_eps=1e-4, scale=1 / math.sqrt(D), eps=1e-4, normalize=True)
    opts.update(dict(options))
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    with one_thread():
        o, (S, z) = naive_linear_attention(
            q, k, v, initial_state=init, output_final_state=True, cu_seqlens=cu, **opts
        )
        g = torch.Generator().manual_seed(7)
        grads_out = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (o, S, z)]
        grads = torch.autograd.grad([o, S, z], leaves, grads_out)
    return o.detach(), (S.detach(), z.detach()), grads_out, grads


def shape_id(B, L, H, D, dtype=None, **extra):
    parts = [f"B{B}", f"L{L}", f"H{H}", f"D{D}"] + [f"{k}" for k, v in extra.items() if v]
    if dtype is not None:
        parts.append(str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16"))
    return "-".join(parts)


def run(backend, q, k, v, init, packed, options, requires_grad=False):
    leaves = [t.detach().clone().requires_grad_(requires_grad) for t in (q, k, v)]
    state = None if init is None else tuple(t.detach().clone().requires_grad_(requires_grad) for t in init)
    cu = torch.tensor(offsets_for(q.shape[1]), dtype=torch.int32, device=q.device) if packed else None
    o, (S, z) = linear_attention(
        *leaves, initial_state=state, output_final_state=True, cu_seqlens=cu, backend=backend, **dict(options)
    )
    return o, (S, z), leaves + (list(state) if state else [])


CASES = [
    # (B, L, H, D, Dv, state, packed, options)
    (2, 1, 3, 16, 16, False, False, "default"),
    (2, 63, 3, 32, 32, True, False, "default"),
    (2, 65, 2, 64, 64, False, False, "identity-unnormalized"),
    (1, 65, 2, 16, 24, True, True, "default"),
    (1, 1000, 2, 32, 32, True, True, "scale0.5-eps1e-2"),
    (1, 1000, 1, 128, 128, False, False, "default"),
    (2, 130, 2, 128, 64, True, False, "identity-unnormalized"),
]


def case_ids(cases) -> list[str]:
    return [
        shape_id(B, L, H, D, Dv=f"Dv{Dv}" if Dv != D else "", state="state" if s else "", packed="cu" if p else "")
        + f"-{o}"
        for B, L, H, D, Dv, s, p, o in cases
    ]


CASE_IDS = case_ids(CASES)


def _case(B, L, H, D, Dv, state, packed, options, dtype):
    n = len(offsets_for(L)) - 1 if packed else B
    q, k, v, init = make_inputs(B, L, H, D, dtype, Dv, n if state else None)
    opts = tuple(OPTIONS[options].items())
    ref = _oracle(B, L, H, D, Dv, state, packed, opts)
    return q, k, v, init, opts, ref


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_reference_matches_naive_float64(case):
    q, k, v, init, opts, (o_ref, (S_ref, z_ref), grads_out, grads_ref) = _case(*case, torch.float64)
    o, (S, z), leaves = run("reference", q, k, v, init, case[6], opts, requires_grad=True)
    assert_close("o", o, o_ref)
    assert_close("S", S, S_ref)
    assert_close("z", z, z_ref)
    grads = torch.autograd.grad([o, S, z], leaves, grads_out)
    for name, g, g_ref in zip(["dq", "dk", "dv", "dS0", "dz0"], grads, grads_ref):
        assert_close(name, g, g_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_matches_oracle(case, dtype):
    q, k, v, init, opts, (o_ref, (S_ref, z_ref), grads_out, grads_ref) = _case(*case, dtype)
    o, (S, z), leaves = run("cpu", q, k, v, init, case[6], opts, requires_grad=True)
    assert o.dtype == dtype and S.dtype == z.dtype == init_dtype(dtype)
    assert_close("o", o, o_ref)
    assert_close("S", S, S_ref)
    assert_close("z", z, z_ref)
    grads = torch.autograd.grad([o, S, z], leaves, [g.to(t.dtype) for g, t in zip(grads_out, (o, S, z))])
    if dtype == torch.float64:
        for name, g, g_ref in zip(["dq", "dk", "dv", "dS0", "dz0"], grads, grads_ref):
            assert_close(name, g, g_ref)
        return
    r_o, (r_S, r_z), r_leaves = run("reference", q, k, v, init, case[6], opts, requires_grad=True)
    r_grads = torch.autograd.grad([r_o, r_S, r_z], r_leaves, [g.float() for g in grads_out])
    for name, g, r, g_ref in zip(["dq", "dk", "dv", "dS0", "dz0"], grads, r_grads, grads_ref):
        assert_close(name, g, g_ref, tol=fp32_grad_tol(rel_rms(r, g_ref)))


def fp32_grad_tol(reference_error: float) -> float:
    """Tolerance for an fp32 gradient: docs/ops.md §3's 1e-5, or, where the fp32 reference itself errs more, 4x its
    error. A lone token's dq is a difference of two O(1) terms (o_t ≈ v_t, the output barely depends on
    q_t), so its fp32 relative error is ~1e-3 in any summation order, the reference's included."""
    return max(TOLERANCE[torch.float32], 4 * reference_error)


def init_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[CASE_IDS[1], CASE_IDS[3], CASE_IDS[4]])
def test_low_precision(case, dtype, backend):
    """Output and input gradients within 1e-2 and twice the error of the fp32-accumulating reference
    in the same dtype (for the reference itself: within 1e-2)."""
    q, k, v, init, opts, (o_ref, (S_ref, z_ref), grads_out, grads_ref) = _case(*case, dtype)
    o, (S, z), leaves = run(backend, q, k, v, init, case[6], opts, requires_grad=True)
    r_o, (r_S, r_z), r_leaves = run("reference", q, k, v, init, case[6], opts, requires_grad=True)
    assert o.dtype == dtype and S.dtype == z.dtype == torch.float32
    upstream = [grads_out[0].to(dtype), grads_out[1].float(), grads_out[2].float()]
    grads = torch.autograd.grad([o, S, z], leaves[:3], upstream)
    r_grads = torch.autograd.grad([r_o, r_S, r_z], r_leaves[:3], upstream)
    assert_low_precision_close("o", o, o_ref, r_o)
    assert_close("S", S, S_ref, tol=TOLERANCE[dtype])
    assert_close("z", z, z_ref, tol=TOLERANCE[dtype])
    for name, g, r, g_ref in zip(["dq", "dk", "dv"], grads, r_grads, grads_ref):
        assert_low_precision_close(name, g, g_ref, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "state, packed, options",
    [(True, False, "default"), (True, True, "identity-unnormalized"), (False, True, "scale0.5-eps1e-2")],
    ids=["state", "state-cu-identity-unnormalized", "cu-scale0.5"],
)
def test_gradcheck_float64(backend, state, packed, options):
    L = 67  # crosses a chunk boundary (both backends chunk by 64)
    n = len(offsets_for(L)) - 1 if packed else 2
    q, k, v, init = make_inputs(1 if packed else 2, L, 1, 4, torch.float64, 3, n if state else None)
    cu = torch.tensor(offsets_for(L), dtype=torch.int32) if packed else None
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([t.requires_grad_() for t in init] if state else [])

    def f(*args):
        init_ = (args[3], args[4]) if state else None
        o, (S, z) = linear_attention(
            *args[:3], initial_state=init_, output_final_state=True, cu_seqlens=cu, backend=backend,
            **OPTIONS[options],
        )
        return o, S, z

    with one_thread():
        assert torch.autograd.gradcheck(f, leaves, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_long_sequence_is_finite(backend):
    """z grows like L: an fp16 normalizer would overflow near L = 6k; the fp32 state must not."""
    L = 65536
    q, k, v, _ = make_inputs(1, L, 1, 16, torch.float16)
    v = v + 4.0  # a large, same-signed v makes S grow like L too
    o, (S, z) = linear_attention(q, k, v, output_final_state=True, backend=backend)
    assert torch.isfinite(o).all() and torch.isfinite(S).all() and torch.isfinite(z).all()
    assert z.max() > 6e4  # beyond fp16's range: a half-precision normalizer would have overflowed
    ref = linear_attention(q.float(), k.float(), v.float(), backend="reference")
    assert_close("o", o, ref, tol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "unnormalized"])
def test_prefix_then_steps_equals_full_sequence(backend, dtype, normalize):
    B, L, H, D, prefix = 2, 70, 3, 32, 61
    q, k, v, _ = make_inputs(B, L, H, D, dtype, Dv=16)
    full = linear_attention(q, k, v, normalize=normalize, backend="reference")
    o, state = linear_attention(
        q[:, :prefix], k[:, :prefix], v[:, :prefix], normalize=normalize, output_final_state=True, backend=backend
    )
    S, z = state
    outs = [o]
    for t in range(prefix, L):
        before = S.clone()
        o_t = linear_attention_step(q[:, t], k[:, t], v[:, t], state, normalize=normalize, backend=backend)
        assert state[0] is S and not torch.equal(S, before)  # updated in place
        outs.append(o_t[:, None])
    got = torch.cat(outs, dim=1)
    if dtype in (torch.float64, torch.float32):
        assert_close("o", got, full)
    else:
        assert_close("o", got, full, tol=TOLERANCE[dtype])
    _, (S_full, z_full) = linear_attention(q, k, v, output_final_state=True, backend="reference")
    assert_close("S", S, S_full, tol=TOLERANCE[S.dtype] * 10)
    assert_close("z", z, z_full, tol=TOLERANCE[z.dtype] * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence_passes_the_state_through(backend):
    q, k, v, (S0, z0) = make_inputs(2, 0, 2, 16, torch.float32, n_state=2)
    q.requires_grad_()
    o, (S, z) = linear_attention(q, k, v, initial_state=(S0, z0), output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 16)
    assert torch.equal(S, S0) and torch.equal(z, z0)
    (o.sum() + S.sum()).backward()
    assert q.grad.shape == q.shape


def test_step_backends_agree_on_views():
    """q, k, v as slices of one fused projection (non-contiguous) and a non-contiguous-head state."""
    B, H, D = 3, 4, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, 3 * H * D, generator=g).view(B, 3, H, D)
    q, k, v = qkv.unbind(1)
    S0 = torch.randn(B, H, D, D, generator=g)
    z0 = torch.rand(B, H, D, generator=g) * 10
    states = {b: (S0.clone(), z0.clone()) for b in BACKENDS}
    outs = {b: linear_attention_step(q, k, v, states[b], backend=b) for b in BACKENDS}
    assert_close("o", outs["cpu"], outs["reference"])
    assert_close("S", states["cpu"][0], states["reference"][0])
    assert_close("z", states["cpu"][1], states["reference"][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_projection_views(backend):
    """q, k, v as non-contiguous slices of one [B, L, 3, H, D] projection, as the model passes them."""
    B, L, H, D = 2, 77, 2, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, L, 3 * H * D, generator=g, dtype=torch.float64).view(B, L, 3, H, D)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    o = linear_attention(q, k, v, backend=backend)
    ref = naive_linear_attention(
        q, k, v, feature_map="elu+1", feature_eps=1e-4, scale=D**-0.5, eps=1e-4, normalize=True,
        initial_state=None, output_final_state=False, cu_seqlens=None,
    )
    assert_close("o", o, ref)


def test_opcheck_cpu_ops():
    assert cpp.load_library() is None
    q, k, v, (S0, z0) = make_inputs(1, 70, 2, 16, torch.float32, 8, n_state=2)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    ops = torch.ops.agiformer_kernels
    for args in [
        (q, k, v, None, None, None, "elu+1", 1e-4, 0.25, 1e-4, True),
        (q, k, v, S0, z0, cu, "identity", 0.0, 0.25, 1e-4, False),
    ]:
        args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        torch.library.opcheck(ops.linear_attention_fwd, args)
    S, z = S0[:1].detach().clone(), z0[:1].detach().clone()
    q, k, v = (t[:, 0].detach() for t in (q, k, v))
    torch.library.opcheck(ops.linear_attention_step, (q, k, v, S, z, "elu+1", 1e-4, 0.25, 1e-4, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).unbind(2)
            return linear_attention(q, k, v, backend=backend)

    torch.manual_seed(0)
    model = Mixer()
    x = torch.randn(2, 70, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    grad = model.qkv.weight.grad.clone()
    model.zero_grad()
    ref = model(x)
    ref.sum().backward()
    assert_close("o", out, ref)
    assert_close("dW", grad, model.qkv.weight.grad)


def test_auto_picks_cpu_kernel_and_explicit_unavailable_backend_raises():
    q, k, v, _ = make_inputs(1, 5, 1, 8, torch.float32)
    from agiformer_kernels import backends

    # the C++ kernel unless it is built for a level where the benchmarks have it slower (backends.CPU_SLOWER)
    slower = ("linear_attention", backends.cpu_kernel_level("linear_attention")) in backends.CPU_SLOWER
    expected = backends._registry["linear_attention"]["reference"].fn if slower else cpp.linear_attention_cpp
    assert backends.select("linear_attention", None, q.device, q, k, v) is expected
    with pytest.raises(BackendError, match="cuda"):
        linear_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
        (lambda a: a.update(k=a["k"][:, :3]), ValueError, "k must have shape"),
        (lambda a: a.update(v=a["v"][:, :4]), ValueError, "v must have shape"),
        (lambda a: a.update(q=a["q"].long()), TypeError, "q must be float16"),
        (lambda a: a.update(v=a["v"].double()), ValueError, "v has dtype"),
        (lambda a: a.update(feature_map="relu"), ValueError, "feature_map"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0.0, 2, 5])), TypeError, "cu_seqlens must be an integer"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError, "must rise from 0"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 2, 5], dtype=torch.int32)), ValueError, "decreasing"),
        (lambda a: a.update(cu_seqlens=torch.tensor([[0, 5]]).int()), ValueError, "cu_seqlens must have 1"),
        (lambda a: a.update(initial_state=torch.zeros(1)), TypeError, "initial_state must be a tuple"),
        (lambda a: a.update(initial_state=(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8))), ValueError, r"state\[0\]"),
        (
            lambda a: a.update(initial_state=(torch.zeros(1, 1, 8, 8, dtype=torch.float16), torch.zeros(1, 1, 8))),
            TypeError,
            r"initial_state\[0\] \(S\) must be torch.float32",
        ),
        (lambda a: a.update(initial_state=(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 7))), ValueError, r"state\[1\]"),
        (lambda a: a.update(backend="tpu"), ValueError, "backend must be one of"),
    ],
    ids=[
        "q-rank", "k-shape", "v-shape", "q-int", "v-dtype", "feature-map", "cu-float", "cu-range", "cu-order",
        "cu-rank", "state-not-tuple", "state-S-shape", "state-S-dtype", "state-z-shape", "backend-name",
    ],
)
def test_bad_inputs_name_the_argument(mutate, error, match):
    q, k, v, _ = make_inputs(1, 5, 1, 8, torch.float32)
    args = dict(q=q, k=k, v=v)
    mutate(args)
    with pytest.raises(error, match=match):
        linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dimensions"),
        (lambda a: a.update(state=(a["state"][0].double(), a["state"][1])), TypeError, r"state\[0\] \(S\) must be"),
        (lambda a: a.update(state=(a["state"][0], a["state"][1][:, :, :3])), ValueError, r"state\[1\] \(z\)"),
        (lambda a: a.update(k=a["k"][:1]), ValueError, "k must have shape"),
    ],
    ids=["q-rank", "state-dtype", "state-z-shape", "k-shape"],
)
def test_step_bad_inputs_name_the_argument(mutate, error, match):
    q, k, v = (torch.randn(2, 3, 8) for _ in range(3))
    args = dict(q=q, k=k, v=v, state=(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8)))
    mutate(args)
    with pytest.raises(error, match=match):
        linear_attention_step(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("state"), **args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cu_seqlens_int64_reads_as_int32(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 3, 10])
    o64 = linear_attention(q, k, v, cu_seqlens=cu, backend=backend)
    o32 = linear_attention(q, k, v, cu_seqlens=cu.int(), backend=backend)
    assert torch.equal(o64, o32)
