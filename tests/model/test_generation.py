"""Incremental generation: greedy output equals greedy decoding by full recomputation."""

import pytest
import torch

from agiformer import AGIFORMER
from agiformer.generation import GEMV_LAYOUT_MIN_PATCHES, generate, stream

CONFIG = dict(d_model=64, n_layers=2, num_heads=4, patch_size=4, window_size=5, dropout=0.0, thinking_steps=2)
P = 4


def model(backend="reference", dtype=torch.float64):
    torch.manual_seed(0)
    return AGIFORMER(**CONFIG, backend=backend).to(dtype).eval()


def teacher_forced_argmax(m, prompt: bytes, continuation: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax, top-2 logit gap, actual byte) of a full forward over prompt + continuation, at every
    byte of the continuation that lies in a whole patch."""
    seq = torch.tensor([list(prompt + continuation)])
    n = (seq.shape[1] - P) // P * P
    with torch.no_grad():
        logits = m(seq[:, :n], seq[:, P : P + n]).reshape(-1, 256)
    start = len(prompt) - P
    top = logits[start:].topk(2, dim=-1).values
    return logits[start:].argmax(-1), top[:, 0] - top[:, 1], seq[0, P + start : P + n]


PROMPTS = [b"abcd", b"0123456789ab", b"hello, world", b"hello, world!", b"The quick brown fox ju"]


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
def test_greedy_equals_full_recomputation(prompt):
    """Beyond the 5-patch window, and with 0..3 leftover prompt bytes forced through the decoder."""
    m = model()
    out = generate(m, prompt, 61)
    assert len(out) == 61
    pred, _, actual = teacher_forced_argmax(m, prompt, out)
    assert torch.equal(pred, actual)


def test_greedy_equals_v1_style_recompute_loop():
    """The v1 loop (rerun the whole sequence, keep the last patch's greedy bytes), prompt of whole patches."""
    m = model()
    seq = list(b"recompute loop!!")
    for _ in range(8):
        with torch.no_grad():
            seq += m(torch.tensor([seq]))[0, -1].tolist()
    assert generate(m, b"recompute loop!!", 32) == bytes(seq[16:])


def test_batch_of_prompts_equals_each_alone():
    m = model()
    together = generate(m, PROMPTS, 30)
    assert together == [generate(m, p, 30) for p in PROMPTS]


def test_auto_backend_fp32_greedy_matches_up_to_ties():
    m = model(backend=None, dtype=torch.float32)
    prompt = b"float32 on the fastest backend: "
    out = generate(m, prompt, 80)
    pred, gap, actual = teacher_forced_argmax(m, prompt, out)
    differs = pred != actual
    assert bool((gap[differs] < 1e-3).all()), f"mismatch at non-tied positions {differs.nonzero().flatten()}"
    assert int(differs.sum()) <= 2


def test_prompt_shorter_than_a_patch_is_an_error():
    with pytest.raises(ValueError, match="at least 4 bytes"):
        generate(model(), [b"abcd", b"ab"], 8)


def test_stop_bytes_and_streaming():
    m = model()
    free = generate(m, b"stop here", 40)
    stop = free[13]
    out = generate(m, b"stop here", 40, stop_bytes=bytes([stop]))
    assert out == free[: free.index(stop) + 1]
    chunks = list(stream(m, [b"stop here", b"abcdefgh"], 10))
    assert [len(c[0]) for c in chunks] == [3, 4, 3] and [len(c[1]) for c in chunks] == [4, 4, 2]
    assert b"".join(c[0] for c in chunks) == free[:10]


def test_sampling_is_seeded_and_top1_is_greedy():
    m = model()
    a = generate(m, b"sampling", 24, temperature=1.0, seed=3)
    assert a == generate(m, b"sampling", 24, temperature=1.0, seed=3)
    assert a != generate(m, b"sampling", 24, temperature=1.0, seed=4)
    assert generate(m, b"sampling", 24, temperature=0.7, top_k=1, seed=5) == generate(m, b"sampling", 24)


def test_generation_lays_widening_weights_out_for_the_gemv_and_restores_them():
    """Inside generation the qkv and first MLP weights are [in, out] storage seen as [out, in] (same values);
    afterwards every parameter is the tensor it was."""
    m = model(dtype=torch.float32)
    before = {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in m.named_parameters()}
    seen = {}
    for _ in stream(m, b"abcdefgh", GEMV_LAYOUT_MIN_PATCHES * P):
        seen = {n: p.stride() for n, p in m.named_parameters()}
    qkv = m.layers[0].attn.qkv.weight
    assert seen["layers.0.attn.qkv.weight"] == (1, qkv.shape[0])  # transposed storage while generating
    assert seen["layers.0.attn.proj.weight"] == m.layers[0].attn.proj.weight.stride()  # square: untouched
    for n, p in m.named_parameters():
        assert (p.data_ptr(), p.stride()) == before[n][:2] and torch.equal(p, before[n][2]), n
    for _ in stream(m, b"abcdefgh", 8):  # a short stream: not worth the copy
        assert all(p.stride() == before[n][1] for n, p in m.named_parameters())
