"""agiformer.transparency: every decomposition sums back to what the model computes (float64, 1e-10) for v1
and a stack of every block and mixer, on random and on trained weights; attention matrices reproduce the
ops; the streamed contributions equal the full ones; tokens, errors, the graph and the command."""

import json
import sys

import pytest
import torch
import torch.nn as nn

from agiformer import AGIFORMER, train
from agiformer.components import MIXERS, Context
from agiformer.transparency import (AgiformerTransparentLlm, ModelInfo, TransparentLlm, contributions, edges,
                                    neuron_contributions, paths_to_prediction, to_networkx)
from agiformer.transparency import __main__ as command
from agiformer_kernels import linear_attention, sliding_window_attention
from agiformer_kernels.nn.linear_attention import EPS, FEATURE_EPS
from tests.utils import assert_close

P = 4
SIZES = dict(d_model=32, num_heads=2, patch_size=P, window_size=3, dropout=0.0, thinking_steps=1)
V1 = dict(SIZES, n_layers=2)
# Every block and every mixer: v1's hybrid pair, sequential linear attention with a SwiGLU and RMSNorm, a
# parallel block of causal and window attention with a GeGLU; RMS final norm, no thinking loop.
MIXED = dict(SIZES, n_layers=3, architecture=[
    {"block_cls": "hybrid"},
    {"block_cls": "sequential", "mixer": {"mixer_cls": "linear_attention", "num_heads": 4},
     "mlp": {"mlp_cls": "glu", "act_fn": "silu"}, "norm": {"norm_cls": "rms"}},
    {"block_cls": "parallel", "mixer": [{"mixer_cls": "causal_attention"},
                                        {"mixer_cls": "window_attention", "window_size": 2}],
     "mlp": {"mlp_cls": "glu", "act_fn": "gelu"}, "norm": {"norm_cls": "rms"}}],
    final_norm={"norm_cls": "rms"}, top={"top_cls": "none"})
CONFIGS = {"v1": V1, "mixed": MIXED}
PROMPTS = ["def main():\n    return 0\n", b"x = [1, 2]\xff"]  # 6 and 2 patches (3 bytes dropped)


def random_model(name: str) -> AGIFORMER:
    torch.manual_seed(0)
    return AGIFORMER.from_config(CONFIGS[name], backend="reference").double().eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> a checkpoint trained for a few steps, v1 and the mixed stack."""
    root = tmp_path_factory.mktemp("transparency")
    text = root / "corpus.txt"
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon"]
    idx = torch.randint(0, len(words), (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    text.write_bytes(b" ".join(words[i] for i in idx))
    paths = {}
    for name, cfg in CONFIGS.items():
        arch = root / f"{name}.json"
        arch.write_text(json.dumps(cfg))
        out = root / name
        args, _ = train.parse_args(["--architecture", str(arch), "--data", str(text), "--out", str(out),
                                    "--steps", "3", "--lr", "3e-3", "--warmup", "0", "--seq-len", "64",
                                    "--batch-size", "2", "--eval-every", "100", "--eval-bytes", "256",
                                    "--backend", "reference", "--device", "cpu"])
        train.train(args, quiet=True)
        paths[name] = out / "last.pt"
    return paths


def check_identities(llm: AgiformerTransparentLlm) -> None:
    """Every identity of docs/transparency.md, for every row, layer, position and head of the last run."""
    model = llm.model
    n_layers = llm.model_info().n_layers
    x = llm._run.x
    with torch.no_grad():
        z = model.encoder(x)
        assert_close("residual_in(0)", llm.residual_in(0), z)
        for layer in range(n_layers):
            z = model.layers[layer](z)
            assert_close(f"residual_out({layer}) against the block", llm.residual_out(layer), z)
        teacher = model(x, torch.zeros_like(x))[:, :, 0]
    assert_close("logits against the model", llm.logits(), teacher)
    assert_close("unembed(residual_out(last))", llm.unembed(llm.residual_out(-1), normalize=True), llm.logits())
    for layer in range(n_layers):
        if layer:
            assert torch.equal(llm.residual_in(layer), llm.residual_out(layer - 1))
        assert_close("residual_out = after_attn + ffn_out", llm.residual_out(layer),
                     llm.residual_after_attn(layer) + llm.ffn_out(layer))
        for b, n in enumerate(llm.lengths()):
            full = torch.stack([llm.attention_output(b, layer, pos) for pos in range(n)])
            assert_close(f"after_attn[{b}] = in + attention_output", llm.residual_after_attn(layer)[b, :n],
                         llm.residual_in(layer)[b, :n] + full)
            parts = llm.decomposed_attn(b, layer)
            heads = len(llm.layer_heads(layer))
            assert parts.shape == (n, n, heads, model.config["d_model"])
            assert_close(f"layer {layer} row {b}: Σ decomposed_attn + bias", parts.sum((1, 2)) +
                         llm.attention_bias(b, layer), full)
            per_head = torch.stack([torch.stack([llm.attention_output(b, layer, pos, h) for h in range(heads)])
                                    for pos in range(n)])
            assert_close("attention_output per head = Σ over sources", per_head, parts.sum(1))
            assert parts.permute(2, 3, 0, 1).triu(1).abs().max() == 0, "a source after its target contributes"
            ffn = torch.stack([llm.decomposed_ffn_out(b, layer, pos).sum(0) for pos in range(n)])
            assert_close("Σ decomposed_ffn_out + bias", ffn + llm.ffn_bias(layer), llm.ffn_out(layer)[b, :n])


@pytest.mark.parametrize("name", CONFIGS)
def test_identities_on_random_weights(name):
    llm = AgiformerTransparentLlm(random_model(name))
    llm.run(PROMPTS)
    assert llm.lengths() == [6, 2] and llm.batch_size() == 2
    check_identities(llm)


@pytest.mark.parametrize("name", CONFIGS)
def test_identities_on_a_trained_checkpoint(trained, name):
    llm = AgiformerTransparentLlm(trained[name], dtype=torch.float64, backend="reference")
    llm.run(PROMPTS)
    check_identities(llm)


def test_a_padded_row_is_the_row_run_alone():
    model = random_model("mixed")
    both, alone = AgiformerTransparentLlm(model), AgiformerTransparentLlm(model)
    both.run(PROMPTS)
    alone.run(PROMPTS[1])
    n = both.lengths()[1]
    assert_close("residual_out", both.residual_out(2)[1, :n], alone.residual_out(2)[0])
    assert_close("decomposed_attn", both.decomposed_attn(1, 0), alone.decomposed_attn(0, 0))
    assert_close("logits", both.logits()[1, :n], alone.logits()[0])


def test_attention_matrices_reproduce_the_ops():
    """A @ v per head is the op's output, called as the mixers call it; a window head is its softmax band, a
    linear head's rows sum to less than 1."""
    model = random_model("mixed")
    llm = AgiformerTransparentLlm(model)
    llm.run(PROMPTS[0])
    n = llm.lengths()[0]
    for layer, block in enumerate(model.layers):
        u = block.norm1(llm.residual_in(layer))
        head = 0
        for m in block.mixers:
            q, k, v = m._split(u)
            if hasattr(m, "norm"):
                o = linear_attention(q, k, v, feature_eps=FEATURE_EPS, eps=EPS, backend="reference")
            else:
                o = sliding_window_attention(q, k, v, getattr(m, "window_size", n), backend="reference")
            for h in range(m.num_heads):
                A = llm.attention_matrix(0, layer, head)
                assert_close(f"layer {layer} head {head}: A @ v", A @ v[0, :, h], o[0, :, h])
                assert A.triu(1).abs().max() == 0
                rows = A.sum(-1)
                if hasattr(m, "norm"):
                    assert (rows < 1).all() and (A >= 0).all()
                else:
                    assert_close("softmax rows", rows, torch.ones_like(rows))
                    window = getattr(m, "window_size", n)
                    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                    assert A[i - j >= window].abs().sum() == 0 and (A[(j <= i) & (i - j < window)] > 0).all()
                head += 1
        assert head == len(llm.layer_heads(layer))


@pytest.mark.parametrize("ord", [1.0, 2.0])
def test_streamed_contributions_are_the_norms_of_decomposed_attn(ord):
    llm = AgiformerTransparentLlm(random_model("mixed"))
    llm.run(PROMPTS)
    for layer in range(3):
        for b in range(2):
            full = torch.linalg.vector_norm(llm.decomposed_attn(b, layer), ord, dim=-1)
            assert_close(f"layer {layer} row {b}", llm.attention_contributions(b, layer, ord), full)


def test_heads_count_every_branch_in_mixer_order():
    llm = AgiformerTransparentLlm(random_model("mixed"))
    info = llm.model_info()
    assert isinstance(llm, TransparentLlm) and isinstance(info, ModelInfo)
    assert (info.n_layers, info.n_heads, info.d_model, info.d_vocab) == (3, 4, 32, 256)
    assert [h.label for h in llm.layer_heads(0)] == ["attn.0", "attn.1", "ssm.0", "ssm.1"]
    assert [h.mixer_cls for h in llm.layer_heads(2)] == ["causal_attention"] * 2 + ["window_attention"] * 2


def test_tokens_keep_patches_and_bytes_apart():
    llm = AgiformerTransparentLlm(random_model("v1"))
    llm.run(["ab\ncd", b"\x00\x01\x02\x03\xe2\x82\xac!"])
    ids = llm.tokens()
    assert ids[0].tolist() == [256 + int.from_bytes(b"ab\nc", "big"), -1]
    assert llm.tokens_to_strings(ids[0]) == ["ab\\nc", ""]
    assert llm.tokens_to_strings(ids[1]) == ["\\x00\\x01\\x02\\x03", "€!"]
    top = llm.unembed(llm.residual_out(1)[0, 0], normalize=True).topk(3).indices
    assert all(len(s) >= 1 for s in llm.tokens_to_strings(top)) and (top < 256).all()
    assert llm.tokens_to_strings([0xff, 256]) == ["\\xff", "\\x00\\x00\\x00\\x00"]
    with pytest.raises(ValueError, match=r"tokens\[0\] = -7"):
        llm.tokens_to_strings([-7])


def test_patch_logits_are_the_teacher_forced_logits():
    model = random_model("v1")
    llm = AgiformerTransparentLlm(model)
    llm.run(PROMPTS[0])
    logits = llm.patch_logits()
    x = llm._run.x
    with torch.no_grad():
        teacher = model(x[:, :-P], x[:, P:])
    assert logits.shape == (1, 6, P, 256)
    assert_close("patch_logits", logits[:, :-1], teacher[:, :5])
    assert_close("first bytes", logits[..., 0, :], llm.logits())


def test_copy_keeps_its_state():
    llm = AgiformerTransparentLlm(random_model("v1"))
    llm.run(PROMPTS[0])
    other = llm.copy()
    other.run("abcdefgh")
    assert llm.lengths() == [6] and other.lengths() == [2] and other.model is llm.model


def test_bad_input_names_the_argument():
    llm = AgiformerTransparentLlm(random_model("v1"))
    with pytest.raises(RuntimeError, match="run"):
        llm.residual_in(0)
    llm.run(PROMPTS)
    for call, message in [(lambda: llm.residual_out(2), "layer = 2"),
                          (lambda: llm.attention_matrix(2, 0, 0), "batch_i"),
                          (lambda: llm.attention_matrix(0, 0, 4), "head = 4"),
                          (lambda: llm.attention_output(1, 0, 2), "pos = 2"),
                          (lambda: llm.neuron_output(0, 128), "neuron = 128"),
                          (lambda: llm.run(["abc"]), r"sentences\[0\]"), (lambda: llm.run([]), "sentences"),
                          (lambda: llm.unembed(torch.zeros(5), True), "t: shape")]:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="layer must be an int"):
        llm.residual_out(1.0)
    with pytest.raises(TypeError, match="model_or_checkpoint_path"):
        AgiformerTransparentLlm(3)


def test_a_mixer_it_cannot_decompose_is_named():
    class TokenShift(nn.Module):
        def __init__(self, ctx: Context):
            super().__init__()
            self.proj = nn.Linear(2 * ctx.d_model, ctx.d_model)

        def forward(self, x):
            return self.proj(torch.cat([x, nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]], -1))

    MIXERS.register("token_shift_t")(TokenShift)
    try:
        model = AGIFORMER.from_config({**V1, "architecture": {"block_cls": "sequential",
                                                              "mixer": {"mixer_cls": "token_shift_t"}}})
        with pytest.raises(NotImplementedError, match="token_shift_t"):
            AgiformerTransparentLlm(model)
    finally:
        MIXERS.unregister("token_shift_t")


def test_contribution_graph_shares_and_paths():
    llm = AgiformerTransparentLlm(random_model("mixed"))
    llm.run(PROMPTS)
    c = contributions(llm, 0, block_bytes=1)  # one target per block: streaming gives the same shares
    whole = contributions(llm, 0)
    for layer in range(3):
        assert_close("streamed", c.attn[layer], whole.attn[layer])
        total = c.attn[layer].sum((1, 2)) + c.attn_residual[layer] + c.attn_bias[layer]
        assert_close("attention shares sum to 1", total, torch.ones_like(total))
        assert_close("FFN shares sum to 1", c.ffn[layer] + c.ffn_residual[layer], torch.ones(6, dtype=torch.float64))
        assert c.attn[layer].permute(2, 0, 1).triu(1).abs().max() == 0
    shares = neuron_contributions(llm, 0, 1, 3)
    assert shares.shape == (llm.decomposed_ffn_out(0, 1, 3).shape[0],)
    assert 0 < float(shares.sum()) <= 1 + 1e-12
    graph = edges(c)
    assert ("M1_2", "I2_2") in {(s, t) for s, t, _, _ in graph}  # a parallel block's FFN reads its input
    path = paths_to_prediction(graph, 5, 3, 0.05)
    assert path and all(w >= 0.05 for _, _, w, _ in path)
    assert any(t == "M2_5" for _, t, _, _ in path)
    assert paths_to_prediction(graph, 5, 3, 2.0) == []


def test_networkx_graph():
    pytest.importorskip("networkx")
    llm = AgiformerTransparentLlm(random_model("v1"))
    llm.run(PROMPTS[0])
    g = to_networkx(contributions(llm), threshold=0.0)
    assert g.number_of_nodes() == 6 * (1 + 3 * 2) and g.nodes["X0_0"]["token"] == "def "
    assert g.edges["A1_4", "M1_4"]["kind"] == "residual"


def test_the_command_prints_and_draws(trained, tmp_path, capsys):
    out = tmp_path / "graph.png"
    args = [str(trained["v1"]), "--prompt", "alpha beta gamma", "--backend", "reference", "--device", "cpu"]
    command.main(args)
    printed = capsys.readouterr().out
    assert "4 patches" in printed and "L1." in printed and "'alph'" in printed
    if "matplotlib" not in sys.modules:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
    command.main([*args, "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_names_the_extra_when_matplotlib_is_missing(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as done:
        command.main([str(trained["v1"]), "--prompt", "alpha beta", "--backend", "reference", "--device", "cpu",
                      "-o", str(tmp_path / "g.png")])
    captured = capsys.readouterr()
    assert done.value.code == 1 and "agiformer-kernels[graph]" in captured.err and "heads:" in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as done:
        command.main([str(trained["v1"]), "--prompt", "ab"])
    assert done.value.code == 2 and "less than one patch" in capsys.readouterr().err
