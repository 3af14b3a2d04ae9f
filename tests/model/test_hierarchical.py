"""The hierarchical autoencoder's components and model (agiformer.hierarchical), on the minute ``test`` config."""

from __future__ import annotations

import copy

import pytest
import torch

from agiformer.hierarchical import HierarchicalAutoencoder, VectorQuantizer, load_config, validate
from agiformer.hierarchical.components import segment_layout


def _model(**changes) -> HierarchicalAutoencoder:
    torch.manual_seed(0)
    cfg = load_config("test")
    for key, value in changes.items():
        cfg[key] = value
    return HierarchicalAutoencoder(cfg)


def _two_levels() -> dict:
    cfg = load_config("test")
    second = copy.deepcopy(cfg["levels"][0])
    second["segmenter"] = {"rule": "delta", "delta": 0.1, "threshold": 2.0, "max_len": 4}
    cfg["levels"].append(second)
    return cfg


def _text(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(97, 123, (n,), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("L", [1, 7, 65])
@pytest.mark.parametrize("levels", [1, 2], ids=["1level", "2level"])
def test_forward_shapes_and_padding_odd_lengths(L, levels):
    torch.manual_seed(0)
    model = HierarchicalAutoencoder(load_config("test") if levels == 1 else _two_levels())
    x = torch.stack([_text(L, s) for s in range(3)])
    lengths = torch.tensor([L, max(1, L // 2), 1])
    out = model(x, lengths=lengths)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert set(out.losses) == {"reconstruction", "commitment", "codebook", "entropy_lm", "causal_lm"}
    assert out.losses["codebook"] == 0  # EMA codebook
    for i in range(1, levels + 1):
        assert {f"l{i}/recon_acc", f"l{i}/bytes_per_code", f"l{i}/perplexity"} <= set(out.metrics)
    assert all(isinstance(v, float) for v in out.metrics.values())
    out.loss.backward()
    # Padding does not reach the data: the padded rows' nll equals that of the rows cut to their length.
    model.eval()
    nll = model.nll(x, lengths=lengths)
    assert nll.shape == (3, L) and nll.dtype == torch.float32
    for b, n in enumerate(lengths.tolist()):
        alone = model.nll(x[b : b + 1, :n])
        torch.testing.assert_close(nll[b, :n], alone[0], rtol=1e-5, atol=1e-5)
        assert (nll[b, n:] == 0).all()
    rec = model.reconstruct(x, lengths=lengths)
    assert rec.shape == (3, L) and rec.dtype == torch.uint8 and (rec[2, 1:] == 0).all()


def test_segment_layout_masks_padding():
    starts = torch.tensor([[1, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    seg = segment_layout(starts, torch.tensor([7, 4]))
    assert seg.count.tolist() == [3, 2]
    assert seg.start.tolist() == [[0, 2, 5], [0, 3, 7]]  # row 1 has 2 valid segments; 7 = L past the count
    assert seg.end.tolist() == [[1, 4, 6], [2, 3, 7]]
    assert seg.seg_id[1].tolist() == [0, 0, 0, 1, 2, 2, 3]  # padding (from position 4) starts its own segments
    assert seg.valid.sum() == 5


def test_nll_is_causal_and_ignores_later_bytes():
    for cfg in (load_config("test"), _two_levels()):
        torch.manual_seed(0)
        model = HierarchicalAutoencoder(cfg).eval()
        x = _text(80)[None]
        base = model.nll(x)
        for u in (1, 17, 40, 79):
            y = x.clone()
            y[0, u] = (int(y[0, u]) + 7) % 256
            y[0, u + 1 :] = _text(79 - u, seed=u)  # every later byte changes too
            torch.testing.assert_close(model.nll(y)[0, :u], base[0, :u], rtol=0, atol=1e-6)


def test_delta_rule_nll_is_causal():
    cfg = load_config("test")
    cfg["levels"][0]["segmenter"] = {"rule": "delta", "delta": 0.05, "threshold": None, "max_len": 5}
    torch.manual_seed(0)
    model = HierarchicalAutoencoder(cfg).eval()
    x = _text(60)[None]
    base = model.nll(x)
    for u in (3, 30):
        y = x.clone()
        y[0, u:] = _text(60 - u, seed=u + 1)
        torch.testing.assert_close(model.nll(y)[0, :u], base[0, :u], rtol=0, atol=1e-6)


def test_expander_cannot_see_codes_of_later_segments():
    model = _model().eval()
    x = _text(60)[None]
    level = model._encode(0, x.long(), torch.tensor([60]), update=False)
    exp = model.expanders[0]

    def recon(level):
        from agiformer.hierarchical.components import RECON
        return exp.logits(exp.trunk(level.ids), level.codes, level.seg.start, level.seg.seg_id, RECON)

    base = recon(level)
    starts = level.seg.start[0, : int(level.seg.count[0])].tolist()
    assert len(starts) >= 3
    u = starts[2]  # the first byte of the third segment
    y = x.clone()
    y[0, u:] = _text(60 - u, seed=5)
    changed = model._encode(0, y.long(), torch.tensor([60]), update=False)
    torch.testing.assert_close(recon(changed)[0, : starts[1]], base[0, : starts[1]], rtol=0, atol=1e-6)


def test_vq_ema_update_and_dead_code_reset():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, {"ema": True, "decay": 0.5, "dead_threshold": 0.1, "reset_interval": 2,
                                "buffer_size": 16})
    z = torch.randn(6, 4)
    vq(z, update=True)  # the first update takes the codebook from the batch
    assert int(vq.updates) == 1 and int(vq.recent_seen) == 6
    # EMA: a code that takes all of a batch moves halfway (decay 0.5) toward the batch mean, count-weighted.
    vq.codebook.zero_(); vq.counts.fill_(1.0); vq.sums.zero_()
    vq.codebook[0] = 1.0
    vq.sums[0] = 1.0
    target = torch.full((4, 4), 3.0)
    out = vq(target + 0.01 * torch.randn(4, 4), update=True)
    assert (out.index == 0).all()
    assert abs(float(vq.counts[0]) - (0.5 + 0.5 * 4)) < 1e-6
    assert int(vq.resets) == 0  # update 2 was a reset step, but every count (>= 0.5) is above the threshold
    vq.counts[1:] = 0.01  # dead
    z2 = torch.randn(5, 4) + 10
    vq(z2, update=True)
    vq(z2, update=True)  # update 4: reset
    assert int(vq.resets) == 7 and not vq.dead().any()
    for k in range(1, 8):  # each reset code is one of the buffered encoder outputs
        assert (vq.codebook[k] - vq.recent).abs().sum(-1).min() < 1e-6
    # Eval: no bookkeeping; padded slots never reach the quantiser (it takes valid rows only).
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    out = vq(torch.randn(3, 4))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    assert out.quantized.shape == (3, 4) and float(out.perplexity) >= 1


def test_straight_through_and_losses():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3, {"ema": False, "decay": 0.9, "dead_threshold": 0.1, "reset_interval": 0,
                                "buffer_size": 4})
    z = torch.randn(5, 3, requires_grad=True)
    out = vq(z)
    torch.testing.assert_close(out.quantized, vq.codebook[out.index])
    (out.quantized.sum() + out.codebook_loss).backward()
    torch.testing.assert_close(z.grad, torch.ones(5, 3))  # straight through
    assert vq.codebook.grad is not None  # the codebook loss trains a learned codebook


def test_training_is_deterministic_and_state_dict_resumes():
    def run(model, steps, opt=None):
        opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for s in range(steps):
            x = torch.stack([_text(33, seed=100 * s + b) for b in range(2)])
            out = model(x)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return float(out.loss.detach()), opt

    a = _model()
    loss_a, _ = run(a, 6)
    b = _model()
    loss_b, _ = run(b, 6)
    assert loss_a == loss_b
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert int(a.quantizers[0].resets) >= 0 and int(a.quantizers[0].updates) == 6
    # Resume: 3 steps, a fresh model and optimiser loaded from their state dicts, 3 more = 6 steps straight.
    def steps(model, first, n, opt):
        model.train()
        for s in range(first, first + n):
            out = model(torch.stack([_text(33, seed=100 * s + b) for b in range(2)]))
            opt.zero_grad()
            out.loss.backward()
            opt.step()

    c = _model()
    opt_c = torch.optim.AdamW(c.parameters(), lr=1e-2)
    steps(c, 0, 3, opt_c)
    d = _model()
    d.load_state_dict(c.state_dict())
    opt_d = torch.optim.AdamW(d.parameters(), lr=1e-2)
    opt_d.load_state_dict(opt_c.state_dict())
    steps(d, 3, 3, opt_d)
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in a.state_dict().items())


def test_stages():
    model = _model()
    assert all(not p.requires_grad for p in model.top_lm.parameters())
    model.set_stage("top")
    model.train()
    assert all(not p.requires_grad for p in model.expanders.parameters())
    assert not model.quantizers[0].training and model.top_lm.training
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("top_lm")}
    out = model(torch.stack([_text(40), _text(40, 1)]))
    assert set(out.losses) == {"top_lm"} and "top_lm/acc" in out.metrics
    out.loss.backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no EMA / threshold update
    assert all(p.grad is None for p in model.compressors.parameters())
    with pytest.raises(ValueError, match="stage"):
        model.set_stage("joint")
    with pytest.raises(ValueError, match="top_lm"):
        _model(top_lm=None).set_stage("top")


@pytest.mark.parametrize("levels", [1, 2], ids=["1level", "2level"])
def test_generate_bytes_from_short_and_long_prompts(levels):
    torch.manual_seed(0)
    model = HierarchicalAutoencoder(load_config("test") if levels == 1 else _two_levels())
    for prompt in (b"a", bytes(_text(1000).tolist())):
        out = model.generate_bytes(prompt, 3)
        assert isinstance(out, bytes) and len(out) == 3
        assert model.generate_bytes(prompt, 3) == out  # greedy is deterministic
    g = torch.Generator().manual_seed(1)
    assert len(model.generate_bytes(b"ab", 4, temperature=1.0, generator=g)) == 4
    assert model.training  # the mode is restored


def test_generate_without_top_lm_uses_the_causal_model():
    model = _model(top_lm=None)
    assert len(model.generate_bytes(b"x", 3)) == 3


def test_bad_input_names_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="prompt"):
        model.generate_bytes(b"", 3)
    with pytest.raises(TypeError, match="prompt"):
        model.generate_bytes("text", 3)
    with pytest.raises(ValueError, match="max_new_bytes"):
        model.generate_bytes(b"a", -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate_bytes(b"a", 1, temperature=-1)
    with pytest.raises(TypeError, match="x"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x"):
        model(torch.full((1, 3), 300))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(2, 3, dtype=torch.uint8), lengths=torch.tensor([0, 3]))


def test_config_validation_and_files():
    cfg = load_config("tiny")
    assert validate(cfg) == cfg and HierarchicalAutoencoder(cfg).config == cfg
    with pytest.raises(TypeError, match="levels\\[0\\]: unknown key 'dmodel'"):
        validate({"levels": [{"dmodel": 3}]})
    with pytest.raises(ValueError, match="levels\\[0\\].segmenter.rule"):
        validate({"levels": [{"segmenter": {"rule": "bpe"}}]})
    with pytest.raises(ValueError, match="num_heads"):
        validate({"levels": [{"d_model": 30, "num_heads": 4}]})
    with pytest.raises(ValueError, match="name_or_path"):
        load_config("no-such-config")
