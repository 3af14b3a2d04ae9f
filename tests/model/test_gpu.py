"""The model on a CUDA device (skipped without one): fused backends against the reference backend."""

import pytest
import torch

from agiformer import AGIFORMER
from agiformer.generation import generate
from tests.utils import assert_close, rel_rms

pytestmark = pytest.mark.gpu
CONFIG = dict(d_model=128, n_layers=2, num_heads=4, patch_size=4, window_size=16, dropout=0.0, thinking_steps=2)


def pair():
    torch.manual_seed(0)
    ref = AGIFORMER(**CONFIG, backend="reference").cuda()
    ours = AGIFORMER(**CONFIG).cuda()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_fp32_logits_and_loss_match_reference():
    ref, ours = pair()
    seq = torch.randint(0, 256, (2, 4 * 50), device="cuda")
    x, y = seq[:, :-4], seq[:, 4:]
    assert_close("logits", ours(x, y), ref.double()(x, y).float(), tol=5e-4)  # tf32 paths
    assert abs(float(ours.loss(x, y)) - float(ref.loss(x, y))) < 1e-3


def test_bf16_autocast_train_step_is_close_to_fp32():
    ref, ours = pair()
    seq = torch.randint(0, 256, (2, 4 * 300), device="cuda")
    exact = ref.double().sequence_loss(seq)
    with torch.autocast("cuda", torch.bfloat16):
        low = ours.sequence_loss(seq)
    low.backward()
    assert rel_rms(low, exact) < 1e-2
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_greedy_generation_matches_teacher_forcing():
    _, ours = pair()
    ours.eval()
    prompt = b"a prompt on the GPU, ending inside a patch"
    out = generate(ours, prompt, 64)
    seq = torch.tensor([list(prompt + out)], device="cuda")
    n = (seq.shape[1] - 4) // 4 * 4
    with torch.no_grad():
        logits = ours(seq[:, :n], seq[:, 4 : 4 + n]).reshape(-1, 256)[len(prompt) - 4 :]
    top = logits.topk(2, dim=-1).values
    differs = logits.argmax(-1) != seq[0, len(prompt) : 4 + n]
    assert bool((top[differs, 0] - top[differs, 1] < 1e-3).all())
