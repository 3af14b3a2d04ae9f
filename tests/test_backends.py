import warnings

import pytest
import torch

from agiformer_kernels import backends
from agiformer_kernels.backends import BackendError, register, select

OP = "_test_double"


def double_reference(x):
    return x * 2


def double_fast(x):
    return x + x


@pytest.fixture(autouse=True)
def toy_op(monkeypatch):
    """A toy op with a 'cpu' backend that declines float64 and a 'cuda' backend that never exists here."""
    monkeypatch.setattr(backends, "_registry", {})
    monkeypatch.setattr(backends, "_availability", {})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_auto_skips", {})
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    register(OP, "reference", double_reference)
    register(OP, "cpu", double_fast, check=lambda x: "float64 unsupported" if x.dtype == torch.float64 else None,
             available=lambda d: None if d == "cpu" else f"it runs only cpu tensors, these are on {d}")
    register(OP, "cuda", double_fast, available=lambda d: "no GPU in this test")
    yield


def pick(x, backend=None):
    return select(OP, backend, x.device, x)


def test_auto_prefers_the_fast_backend():
    assert pick(torch.ones(2)) is double_fast


def test_auto_order_is_per_op_on_cuda(monkeypatch):
    """On CUDA tensors auto tries Triton first, except for the ops OP_AUTO_ORDER puts on CUDA first."""

    def triton_fn(x):
        return x

    register(OP, "triton", triton_fn)
    register(OP, "cuda", double_fast)
    cuda = torch.device("cuda")
    assert select(OP, None, cuda, torch.ones(2)) is triton_fn
    monkeypatch.setitem(backends.OP_AUTO_ORDER, (OP, "cuda"), backends.CUDA_FIRST)
    assert select(OP, None, cuda, torch.ones(2)) is double_fast
    assert select(OP, None, torch.device("cpu"), torch.ones(2)) is double_fast  # CPU tensors: unchanged


def test_auto_falls_back_with_one_warning():
    x = torch.ones(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="'cpu' cannot serve this call \\(float64 unsupported\\); using 'reference'"):
        assert pick(x) is double_reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick(x) is double_reference  # the second fallback is silent


def test_explicit_backend_that_cannot_serve_raises():
    with pytest.raises(BackendError, match="'cpu' cannot serve this call: float64 unsupported"):
        pick(torch.ones(2, dtype=torch.float64), "cpu")
    with pytest.raises(BackendError, match="no GPU in this test"):
        pick(torch.ones(2), "cuda")
    with pytest.raises(BackendError, match="has no 'triton' backend"):
        pick(torch.ones(2), "triton")


def test_unknown_backend_name_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        pick(torch.ones(2), "fast")
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="AGIFORMER_KERNELS_BACKEND must be one of"):
        pick(torch.ones(2))


def test_environment_variable_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert pick(torch.ones(2)) is double_reference
    assert pick(torch.ones(2), "cpu") is double_fast  # an explicit argument wins
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendError):
        pick(torch.ones(2))


def test_available_backends_reports_reasons():
    report = backends.available_backends("cpu")[OP]
    assert report == {
        "reference": "available",
        "cpu": "available",
        "triton": "not implemented for this op",
        "cuda": "no GPU in this test",
    }


def test_auto_skips_a_cpu_kernel_slower_than_the_reference_at_its_level(monkeypatch):
    """CPU_SLOWER: auto takes the reference (one warning), a named 'cpu' still serves, and available_backends says
    why; at a level not listed the kernel is auto's choice."""
    monkeypatch.setattr(backends, "cpu_kernel_level", lambda op: "x86-64-v2")
    monkeypatch.setitem(backends.CPU_SLOWER, (OP, "x86-64-v2"), "0.5x, measured")
    with pytest.warns(RuntimeWarning, match="built for x86-64-v2, where it is slower than the reference"):
        assert pick(torch.ones(2)) is double_reference
    assert pick(torch.ones(2), "cpu") is double_fast
    assert backends.available_backends("cpu")[OP]["cpu"].startswith("available; auto skips it: built for x86-64-v2")
    monkeypatch.setattr(backends, "_auto_skips", {})
    monkeypatch.setattr(backends, "cpu_kernel_level", lambda op: "x86-64-v3")
    assert pick(torch.ones(2)) is double_fast


def test_selection_traces_under_torch_compile():
    def f(x):
        return pick(x)(x).sin()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(5)
    torch.testing.assert_close(compiled(x), (2 * x).sin())
    x64 = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(compiled(x64), (2 * x64).sin())  # guards on dtype, re-selects
