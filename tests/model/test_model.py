"""agiformer.AGIFORMER against AGIFORMER v1 (benchmarks/baselines/v1.py) and the ops' naive oracles."""

import pytest
import torch
import torch.nn.functional as F

import agiformer_kernels.nn.head as nn_head
import agiformer_kernels.nn.linear_attention as nn_linear
import agiformer_kernels.nn.sliding_window_attention as nn_window
from agiformer import AGIFORMER
from agiformer.checkpoint import load_model
from agiformer_kernels.ops.gru_patch.reference import naive_gru_patch_decode
from agiformer_kernels.ops.linear_attention.reference import naive_linear_attention
from agiformer_kernels.ops.sliding_window_attention.reference import naive_sliding_window_attention
from benchmarks.baselines import v1
from tests.utils import assert_close

SMALL = dict(d_model=64, n_layers=2, num_heads=4, patch_size=4, window_size=8, dropout=0.1, thinking_steps=2)


def pair(**config):
    ref = v1.AGIFORMER(**config).double().eval()
    ours = AGIFORMER(**config, backend="reference").double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def batch(B=2, patches=13, P=4):
    seq = torch.randint(0, 256, (B, (patches + 1) * P + 3))  # trailing bytes of an incomplete patch
    n = patches * P
    return seq[:, :n], seq[:, P : P + n]


def test_default_config_parameters_and_state_dict_keys():
    ours, ref = AGIFORMER(), v1.AGIFORMER()
    assert sum(p.numel() for p in ours.parameters()) == 31_199_744
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "encoder.inv_freq" in ours.state_dict()
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_logits_bytes_and_loss_match_v1_float64():
    ref, ours = pair(**SMALL)
    x, y = batch()
    logits = ref(x, y)
    assert_close("logits", ours(x, y), logits)
    assert torch.equal(ours(x), ref(x))  # greedy bytes of every next patch
    ce = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert_close("fused loss", ours.loss(x, y), ce)
    seq = torch.cat([x, y[:, -4:]], dim=1)
    assert_close("sequence_loss", ours.sequence_loss(seq), ce)


def test_logits_match_the_naive_oracles(monkeypatch):
    """The model on the ops' loop-by-loop oracles gives v1's logits."""
    ref, ours = pair(**SMALL)
    monkeypatch.setattr(nn_linear, "linear_attention", lambda q, k, v, *, feature_eps, eps, backend: (
        naive_linear_attention(q, k, v, feature_map="elu+1", feature_eps=feature_eps, scale=q.shape[-1] ** -0.5,
                               eps=eps, normalize=True, initial_state=None, output_final_state=False,
                               cu_seqlens=None)))
    monkeypatch.setattr(nn_window, "sliding_window_attention",
                        lambda q, k, v, window, *, backend: naive_sliding_window_attention(q, k, v, window))
    monkeypatch.setattr(nn_head, "gru_patch_decode", lambda *args, backend: naive_gru_patch_decode(*args))
    x, y = batch(B=1, patches=11)
    assert_close("naive-oracle logits", ours(x, y), ref(x, y))


def test_v1_state_dict_file_loads_strict(tmp_path):
    ref = v1.AGIFORMER(**{**SMALL, "num_heads": 8}).eval()
    torch.save(ref.state_dict(), tmp_path / "best_model.pth")
    model, _ = load_model(tmp_path / "best_model.pth", backend="reference",
                          overrides=dict(num_heads=8, window_size=8, thinking_steps=2))
    assert model.config["d_model"] == 64 and model.config["n_layers"] == 2
    x, y = batch()
    assert_close("v1 checkpoint logits", model.double()(x, y), ref.double()(x, y))


def test_training_gradients_match_v1():
    ref, ours = pair(**{**SMALL, "dropout": 0.0})
    ref.train(), ours.train()
    x, y = batch()
    F.cross_entropy(ref(x, y).reshape(-1, 256), y.reshape(-1)).backward()
    ours.loss(x, y).backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_close(f"grad {name}", a.grad, b.grad, tol=1e-9)


def test_vocab_must_be_bytes():
    with pytest.raises(ValueError, match="vocab_size must be 256"):
        AGIFORMER(vocab_size=512)
