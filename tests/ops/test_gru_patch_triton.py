"""The Triton GRU patch kernels against the float64 oracle.

Without a GPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), where a
256-wide program step costs tens of milliseconds: M = 1000 runs at h = 32, h = 256 at M <= 65.
The interpreter has no 16-bit dot, so bf16/fp16 products are taken in fp32 there (exact for 16-bit
operands); on a GPU they run on tensor cores.
"""

from __future__ import annotations

import pytest
import torch

from agiformer_kernels import gru_patch_byte_table, gru_patch_decode, gru_patch_loss, gru_patch_sample
from agiformer_kernels.ops.gru_patch import reference as R
from tests.ops.test_gru_patch import (
    DECODE_NAMES,
    SHAPES,
    check_decode,
    check_distribution,
    check_greedy,
    check_loss,
    decode_args,
    loss_args,
    make_inputs,
    sample_args,
    shape_id,
)
from tests.utils import assert_close

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

DECODE_CASES = (
    [(M, P, h, F32) for M, P, h in SHAPES if M < 1000 or h == 32]
    + [(3, 4, 32, F64), (65, 4, 256, F32), (3, 4, 32, BF16), (65, 4, 256, BF16), (3, 8, 32, F16)]
)


@pytest.mark.parametrize("M,P,h,dtype", DECODE_CASES, ids=[shape_id(*c) for c in DECODE_CASES])
def test_decode(M, P, h, dtype):
    check_decode("triton", M, P, h, dtype, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("M,P,h", [s for s in SHAPES if s[0] == 1000 and s[2] == 256], ids=lambda v: str(v))
def test_decode_large_gpu(M, P, h):
    check_decode("triton", M, P, h, F32, DEVICE)
    check_decode("triton", M, P, h, BF16, DEVICE)


LOSS_CASES = [(1, 1, 32, F32, "none"), (3, 4, 256, F32, "mean"), (1000, 8, 32, F32, "mean"),
              (3, 4, 32, F64, "none"), (3, 4, 32, BF16, "mean"), (65, 4, 32, F16, "sum")]


@pytest.mark.parametrize("M,P,h,dtype,reduction", LOSS_CASES, ids=[shape_id(*c[:4]) + f"-{c[4]}" for c in LOSS_CASES])
def test_loss(M, P, h, dtype, reduction):
    check_loss("triton", M, P, h, dtype, reduction, DEVICE)


GREEDY_CASES = [(1, 1, 32, F32), (3, 8, 32, F32), (40, 4, 256, F32), (1000, 4, 32, F32), (3, 4, 32, F64)]


@pytest.mark.parametrize("M,P,h,dtype", GREEDY_CASES, ids=[shape_id(*c) for c in GREEDY_CASES])
def test_greedy_sample_equals_reference_argmax(M, P, h, dtype):
    check_greedy("triton", M, P, h, dtype, DEVICE, prefix_len=min(P - 1, 2))
    check_greedy("triton", M, P, h, dtype, DEVICE)


@pytest.mark.parametrize("temperature,top_k", [(0.8, None), (1.3, 12)], ids=["T0.8", "T1.3-top12"])
def test_sample_distribution(temperature, top_k):
    check_distribution("triton", DEVICE, M=4000, temperature=temperature, top_k=top_k)


def test_sample_same_bytes_as_reference_for_same_seed():
    """Same counter hash as the reference; the kernel's running sums are a tree scan in fp32 (the
    reference's are sequential), so a draw landing within rounding of a CDF edge may differ: rare."""
    x, _ = make_inputs(1000, 3, 32, F32, DEVICE, head_scale=4.0)
    kw = dict(patch_size=3, temperature=0.9, top_k=40)
    out = gru_patch_sample(*sample_args(x), generator=torch.Generator(DEVICE).manual_seed(8), backend="triton", **kw)
    ref = gru_patch_sample(*sample_args(x), generator=torch.Generator(DEVICE).manual_seed(8), backend="reference",
                           **kw)
    assert float((out == ref).double().mean()) >= 0.995


@pytest.mark.parametrize("bad,expected", [((140, 7, 201), 7), ((9, 100), 9)], ids=["nan", "inf"])
def test_sample_takes_the_first_nan_or_infinite_logit(bad, expected):
    """As tests/ops/test_gru_patch.py's NaN and infinity tests: torch.argmax's pick, greedy and sampling (tl.argmax
    leaves NaNs to its reduction order)."""
    x, _ = make_inputs(5, 3, 32, F32, DEVICE)
    x["head_bias"][list(bad)] = float("nan") if expected == 7 else float("inf")
    for kw in (dict(), dict(temperature=1.0, top_k=40), dict(temperature=1.0)):
        gen = torch.Generator(DEVICE).manual_seed(3)
        out = gru_patch_sample(*sample_args(x), patch_size=3, generator=gen, backend="triton", **kw)
        assert (out == expected).all(), (kw, out.unique())


def test_sample_with_byte_table_equals_without():
    x, _ = make_inputs(5, 3, 32, F32, DEVICE, head_scale=4.0)
    table = gru_patch_byte_table(x["byte_emb"], x["weight_ih"])
    for kw in (dict(), dict(temperature=0.9, top_k=40)):
        def run(**extra):
            gen = torch.Generator(DEVICE).manual_seed(8)
            return gru_patch_sample(*sample_args(x), patch_size=3, generator=gen, backend="triton", **kw, **extra)

        assert torch.equal(run(byte_table=table), run()), kw


def test_sample_generator_state_and_top1():
    x, _ = make_inputs(64, 4, 32, F32, DEVICE, head_scale=4.0)

    def draw(gen, **kw):
        return gru_patch_sample(*sample_args(x), patch_size=4, generator=gen, backend="triton", **kw)

    gen = torch.Generator(DEVICE).manual_seed(42)
    first, second = draw(gen, temperature=1.0), draw(gen, temperature=1.0)
    assert not torch.equal(first, second)
    assert torch.equal(first, draw(torch.Generator(DEVICE).manual_seed(42), temperature=1.0))
    assert torch.equal(draw(None), draw(None, temperature=3.0, top_k=1))


def test_non_contiguous_inputs():
    M, P, h = 37, 4, 32
    x, b = make_inputs(M, P, h, F32, DEVICE)
    wide = torch.randn(M, 3 * h, device=DEVICE)
    wide[:, h:2 * h] = x["context"]
    strided = dict(x, context=wide[:, h:2 * h], weight_ih=x["weight_ih"].T.contiguous().T,
                   head_weight=x["head_weight"].T.contiguous().T)
    b32 = torch.stack([b, b], 2).to(torch.int32)[..., 1]
    assert_close("hidden", gru_patch_decode(*decode_args(strided, b32), backend="triton"),
                 R.naive_gru_patch_decode(*decode_args(x, b)), tol=1e-5)
    assert_close("loss", gru_patch_loss(*loss_args(strided, b32), backend="triton"), R.naive_gru_patch_loss(*loss_args(x, b)),
                 tol=1e-5)
    assert torch.equal(gru_patch_sample(*sample_args(strided), patch_size=P, backend="triton"),
                       R.naive_gru_patch_sample(*sample_args(x), patch_size=P))


def test_empty_batch():
    x, b = make_inputs(3, 4, 32, F32, DEVICE, requires_grad=True)
    x0 = dict(x, context=x["context"][:0])
    hidden = gru_patch_decode(*decode_args(x0, b[:0]), backend="triton")
    assert hidden.shape == (0, 4, 32)
    hidden.sum().backward()
    assert not x["weight_hh"].grad.any()
    assert gru_patch_loss(*loss_args(x0, b[:0]), reduction="none", backend="triton").shape == (0, 4)
    assert gru_patch_sample(*sample_args(x0), patch_size=4, backend="triton").shape == (0, 4)


def test_opcheck():
    from agiformer_kernels.ops.gru_patch import triton as T

    x, b = make_inputs(5, 3, 16, F32, DEVICE, requires_grad=True)
    torch.library.opcheck(T.decode_fwd, (*decode_args(x, b), True))
    for head_grad in (False, True):  # the head gradient is left to the backward either way
        torch.library.opcheck(T.loss_fwd, (*loss_args(x, b), 3, True, head_grad))
    seed = R.draw_seed(torch.Generator(DEVICE).manual_seed(0), torch.device(DEVICE))
    torch.library.opcheck(T.sample_op, (*sample_args(x), 4, 0.7, 10, b[:, :1], 2, seed, None))


def test_gradients_of_unused_outputs_are_skipped():
    """Only the inputs that need a gradient get one (the others stay None)."""
    x, b = make_inputs(4, 3, 16, F32, DEVICE)
    x["weight_hh"].requires_grad_()
    gru_patch_decode(*decode_args(x, b), backend="triton").sum().backward()
    assert x["weight_hh"].grad is not None and all(x[k].grad is None for k in DECODE_NAMES if k != "weight_hh")


def test_gpu_config_per_kernel():
    """On a GPU each recurrence kernel launches with its own GPU_CONFIGS entry (what benchmarks/tune_gru.py varies),
    its blocks capped at the hidden size's power of two."""
    from agiformer_kernels.ops.gru_patch import triton as gt

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    for kernel, config in gt.GPU_CONFIGS.items():
        args = gt._Config(256, BF16, cuda, kernel).recurrence()
        assert (args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"], args["num_warps"], args["num_stages"]) == config
    assert gt._Config(16, BF16, cuda, "bwd").recurrence()["BLOCK_K"] == 16


@pytest.mark.gpu
def test_tensor_core_products_sum_in_fp32():
    """_mm and _bmm on bf16 CUDA operands (cuBLAS with an fp32 output) give the fp32 product of the upcast operands,
    for the strided views the backward passes them (transposed, step-major)."""
    from agiformer_kernels.ops.gru_patch import triton as gt

    gen = torch.Generator("cuda").manual_seed(0)
    a = torch.randn(300, 768, device="cuda", generator=gen).bfloat16()
    b = torch.randn(256, 300, device="cuda", generator=gen).bfloat16()
    out = gt._mm(a.T, b.T)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.T.float() @ b.T.float(), rtol=1e-5, atol=1e-4)
    dgh = torch.randn(4, 300, 2 * 768, device="cuda", generator=gen).bfloat16()
    hid = torch.randn(300, 4, 256, device="cuda", generator=gen).bfloat16()
    x, y = dgh[1:].transpose(1, 2), hid[:, :-1].transpose(0, 1)
    out = gt._bmm(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ y.float(), rtol=1e-5, atol=1e-4)
