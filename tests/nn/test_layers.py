"""agiformer_kernels.nn against the v1 modules (float64, same weights) and their own streaming paths."""

import pytest
import torch

from agiformer_kernels import available_backends
from agiformer_kernels import nn as kn
from benchmarks.baselines import v1
from tests.utils import assert_close

F64 = torch.float64


def pair(v1_cls, ours_cls, *args, backend="reference", **kw):
    ref = v1_cls(*args, **kw).to(F64).eval()
    ours = ours_cls(*args, **kw, backend=backend).to(F64).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def cpu_backend_reason():
    reasons = {op: r["cpu"] for op, r in available_backends("cpu").items() if r["cpu"] != "available"}
    return str(reasons) if reasons else None


@pytest.mark.parametrize("L", [1, 63, 65])
def test_linear_attention_matches_v1(L):
    ref, ours = pair(v1.LinearAttention, kn.LinearAttention, 48, 3, 0.1)
    x = torch.randn(2, L, 48, dtype=F64)
    assert_close(f"B2-L{L}-H3-D16", ours(x), ref(x))


@pytest.mark.parametrize("L,window", [(1, 4), (63, 1), (65, 16), (40, 64)], ids=lambda v: str(v))
def test_sliding_window_attention_matches_v1(L, window):
    ref, ours = pair(v1.SlidingWindowAttention, kn.SlidingWindowAttention, 48, 3, window)
    x = torch.randn(2, L, 48, dtype=F64)
    assert_close(f"B2-L{L}-W{window}", ours(x), ref(x))


def test_hybrid_block_and_reasoning_match_v1():
    ref, ours = pair(v1.HybridBlock, kn.HybridBlock, 64, 4, 8, 0.1)
    x = torch.randn(2, 37, 64, dtype=F64)
    assert_close("hybrid", ours(x), ref(x))
    ref, ours = pair(v1.RecurrentReasoningBlock, kn.RecurrentReasoningBlock, 64, 3, 0.1)
    assert_close("reasoning", ours(x), ref(x))


@pytest.mark.parametrize("L", [4, 23, 64])
def test_encoder_matches_v1(L):
    ref, ours = pair(v1.ByteLatentEncoder, kn.ByteLatentEncoder, 32, 4, 0.1)
    assert "inv_freq" in ref.state_dict()
    x = torch.randint(0, 256, (2, L))
    assert_close(f"encoder-L{L}", ours(x), ref(x))


def test_head_logits_loss_and_greedy_match_v1():
    ref, ours = pair(v1.LocalAutoregressiveHead, kn.LocalAutoregressiveHead, 32, 4, 16)
    latent = torch.randn(2, 7, 32, dtype=F64)
    y = torch.randint(0, 256, (2, 28))
    logits = ref(latent, y)
    assert_close("logits", ours(latent, y), logits)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert_close("loss", ours.loss(latent, y), ce)
    assert torch.equal(ours(latent), ref(latent))


def test_head_prefix_forces_bytes():
    _, ours = pair(v1.LocalAutoregressiveHead, kn.LocalAutoregressiveHead, 32, 4, 16)
    latent = torch.randn(5, 32, dtype=F64)
    free = ours.sample(latent)
    prefix = torch.randint(0, 256, (5, 2))
    forced = ours.sample(latent, prefix=prefix)
    assert torch.equal(forced[:, :2], prefix)
    # forcing the greedy bytes themselves changes nothing
    assert torch.equal(ours.sample(latent, prefix=free[:, :3]), free)


def test_head_cached_byte_table_samples_the_same_bytes():
    _, ours = pair(v1.LocalAutoregressiveHead, kn.LocalAutoregressiveHead, 32, 4, 16)
    ours = ours.float()
    latent = torch.randn(13, 32)
    free = ours.sample(latent)
    with ours.cached_byte_table():
        assert torch.equal(ours.sample(latent), free)
        outer = ours._byte_tables
        assert list(outer) == [(torch.float32, torch.device("cpu"))]
        with ours.cached_byte_table():  # nested: its own tables, the outer ones come back after it
            assert ours._byte_tables == {}
            assert torch.equal(ours.sample(latent), free)
        assert ours._byte_tables is outer
        assert torch.equal(ours.sample(latent), free)
    assert ours._byte_tables is None


@pytest.mark.parametrize("window", [1, 5, 64])
def test_streaming_equals_full_sequence(window):
    """prefill on a prefix + one step per position reproduces the full forward, window wrap included."""
    block = kn.HybridBlock(48, 3, window, 0.0, backend="reference").to(F64).eval()
    x = torch.randn(2, 19, 48, dtype=F64)
    full = block(x)
    y, state = block.prefill(x[:, :6])
    assert_close("prefill", y, full[:, :6])
    for t in range(6, 19):
        pos = t if t % 2 else torch.full((2,), t)
        assert_close(f"step {t}", block.step(x[:, t], state, pos), full[:, t])


def test_encoder_step_at_absolute_positions():
    enc = kn.ByteLatentEncoder(32, 4, 0.0).to(F64).eval()
    x = torch.randint(0, 256, (3, 40))
    full = enc(x)
    assert_close("step", enc.step(x[:, 28:32], torch.tensor([7, 7, 7])), full[:, 7])
    assert_close("encode from 5", enc.encode(x[:, 20:], 5), full[:, 5:])


def test_cpu_backend_layers_match_v1_fp32():
    reason = cpu_backend_reason()
    if reason:
        pytest.skip(f"cpu backend unavailable: {reason}")
    torch.manual_seed(1)
    ref = v1.HybridBlock(64, 4, 8, 0.0).eval()
    ours = kn.HybridBlock(64, 4, 8, 0.0, backend="cpu").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 33, 64)
    assert_close("hybrid cpu", ours(x), ref.double()(x.double()), tol=1e-5)
    head_ref = v1.LocalAutoregressiveHead(32, 4, 16)
    head = kn.LocalAutoregressiveHead(32, 4, 16, backend="cpu")
    head.load_state_dict(head_ref.state_dict())
    latent, y = torch.randn(3, 5, 32), torch.randint(0, 256, (3, 20))
    assert_close("head cpu", head(latent, y), head_ref.double()(latent.double(), y), tol=1e-5)


def test_mlp_recomputing_gelu_has_exact_gradients():
    from agiformer_kernels.nn.mlp import MLP, gelu_mlp

    mlp = MLP(8, 0.0).to(F64)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    params = (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
    assert torch.autograd.gradcheck(gelu_mlp, (x, *params))
    plain = torch.nn.Sequential(*mlp)  # nn.Sequential's own forward: autograd through F.gelu
    assert_close("forward", mlp(x), plain(x))
    with torch.no_grad():
        assert_close("no-grad forward", mlp(x), plain(x))


def test_dropout_with_bool_mask():
    from agiformer_kernels.nn.dropout import Dropout

    drop = Dropout(0.3).to(F64)
    x = torch.randn(64, 64, dtype=F64, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert_close("kept scaled", y[kept], x[kept] / 0.7)
    assert 0.6 < float(kept.double().mean()) < 0.8
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.to(F64) / 0.7)
    assert torch.equal(drop.eval()(x), x)
