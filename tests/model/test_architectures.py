"""Composable architectures: every registered combination builds, trains and generates incrementally exactly as
by full recomputation; v1 through the registry is v1; bad configs fail in one message naming the place;
checkpoints and the command lines take any architecture."""

import itertools
import json

import pytest
import torch
import torch.nn as nn

from agiformer import AGIFORMER, checkpoint, evaluate, generate, inspect, train
from agiformer.components import BLOCKS, EMBEDDINGS, HEADS, MIXERS, MLPS, NORMS, TOPS, Context, flavors
from agiformer.components import mixers
from agiformer.components.mixers import CausalAttention, _sdpa
from agiformer.errors import CheckpointError
from agiformer.generation import generate as api_generate
from benchmarks.baselines import v1
from tests.tools.tiny_runs import TINY
from tests.utils import assert_close

P = 4
SIZES = dict(d_model=32, n_layers=1, num_heads=2, patch_size=P, window_size=3, dropout=0.0, thinking_steps=1)


def teacher_forced_argmax(m, prompt: bytes, continuation: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, actual byte) of one full forward over prompt + continuation, at each byte of the continuation
    that lies in a whole patch."""
    seq = torch.tensor([list(prompt + continuation)])
    n = (seq.shape[1] - P) // P * P
    with torch.no_grad():
        logits = m(seq[:, :n], seq[:, P : P + n]).reshape(-1, 256)
    start = len(prompt) - P
    return logits[start:].argmax(-1), seq[0, P + start : P + n]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 40 KB of varied text: val and test splits of about 2 KB each."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    idx = torch.randint(0, len(words), (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    path.write_bytes(b" ".join(words[i] + (b".\n" if i == 3 else b"") for i in idx))
    return path


def assert_incremental_equals_recompute(m, prompts=(b"abcdef", b"0123456789abcd"), n=22):
    """A batch of prompts of different lengths (KV caches of different sizes merged), past the window and
    past a KV cache's first doubling: each row's greedy continuation is what full recomputation predicts."""
    outs = api_generate(m, list(prompts), n)
    for prompt, out in zip(prompts, outs):
        assert len(out) == n
        pred, actual = teacher_forced_argmax(m, prompt, out)
        assert torch.equal(pred, actual), f"prompt {prompt!r}: incremental {actual.tolist()} != {pred.tolist()}"


# every combination ----------------------------------------------------------------------------------

MIXER_SETS = [{"mixer_cls": name} for name in MIXERS] + [[{"mixer_cls": name} for name in MIXERS]]
COMBINATIONS = list(itertools.product(BLOCKS, MIXER_SETS, MLPS, NORMS))


def combination_id(combo) -> str:
    block, mixer, mlp, norm = combo
    mixers = "+".join(m["mixer_cls"] for m in mixer) if isinstance(mixer, list) else mixer["mixer_cls"]
    return f"{block}-{mixers}-{mlp}-{norm}"


@pytest.mark.parametrize("combo", COMBINATIONS, ids=[combination_id(c) for c in COMBINATIONS])
def test_every_combination_trains_and_generates_incrementally(combo):
    block, mixer, mlp, norm = combo
    layer = {"block_cls": block, "mixer": mixer, "mlp": {"mlp_cls": mlp}, "norm": {"norm_cls": norm}}
    torch.manual_seed(0)
    m = AGIFORMER.from_config({**SIZES, "architecture": layer}, backend="reference").double()
    seq = torch.randint(0, 256, (2, 40))
    loss = m.sequence_loss(seq)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no finite gradient"
    m.eval()
    assert_incremental_equals_recompute(m)


@pytest.mark.parametrize("top", list(TOPS))
def test_the_heterogeneous_flavor_and_every_top_stage_generate_incrementally(top):
    cfg = {**flavors.flavor("tiny-mixed"), "d_model": 32, "num_heads": 2, "top": {"top_cls": top}}
    cfg["architecture"][1]["mixer"]["num_heads"] = 1
    torch.manual_seed(0)
    m = AGIFORMER.from_config(cfg, backend="reference").double().eval()
    assert_incremental_equals_recompute(m, prompts=(b"heterogeneous", b"abcd", b"0123456789abcdefghij"), n=30)


def test_registries_hold_the_documented_components():
    """In registration order (v1's first); components registered at run time (the README's) come after."""
    for registry, names in [(EMBEDDINGS, ["byte_patch"]), (MIXERS, ["window_attention", "linear_attention",
                            "causal_attention"]), (BLOCKS, ["hybrid", "sequential", "parallel"]),
                            (MLPS, ["mlp", "glu"]), (NORMS, ["layer", "rms"]), (TOPS, ["reasoning", "none"]),
                            (HEADS, ["gru_patch"])]:
        assert list(registry)[: len(names)] == names


# v1 -------------------------------------------------------------------------------------------------

def test_v1_through_the_registry_is_v1():
    """The v1 flavor and AGIFORMER(): v1's keys in v1's order and 31,199,744 parameters."""
    ref = v1.AGIFORMER()
    for model in (AGIFORMER.from_config(flavors.flavor("v1")), AGIFORMER.from_config(AGIFORMER().config)):
        assert sum(p.numel() for p in model.parameters()) == 31_199_744
        assert list(model.state_dict()) == list(ref.state_dict())
        assert model.config == AGIFORMER().config
        json.dumps(model.config)


def test_v1_as_an_explicit_config_gives_v1_logits_float64():
    small = dict(d_model=64, n_layers=2, num_heads=4, patch_size=4, window_size=8, dropout=0.1, thinking_steps=2)
    ref = v1.AGIFORMER(**small).double().eval()
    explicit = {**flavors.flavor("v1"), **small}
    for model in (AGIFORMER(**small, backend="reference"), AGIFORMER.from_config(explicit, backend="reference")):
        model = model.double().eval()
        model.load_state_dict(ref.state_dict(), strict=True)
        x, y = torch.randint(0, 256, (2, 44)), torch.randint(0, 256, (2, 44))
        assert_close("v1 logits", model(x, y), ref(x, y), tol=1e-6)


# bad configs ----------------------------------------------------------------------------------------

LAYER = {"block_cls": "sequential", "mixer": {"mixer_cls": "linear_attention"}}
BAD = [
    ({"architecture": [LAYER, {**LAYER, "block_cls": "xyz"}]}, ValueError,
     "architecture[1].block_cls = 'xyz': no such block; registered: hybrid, sequential, parallel"),
    ({"architecture": [LAYER, {**LAYER, "mixer": [{"mixer_cls": "window_attention"}, {"mixer_cls": "mha"}]}]},
     ValueError, "architecture[1].mixer[1].mixer_cls = 'mha': no such mixer; registered: window_attention"),
    ({"architecture": {**LAYER, "mlp": {"mlp_cls": "deep"}}}, ValueError, "architecture.mlp.mlp_cls = 'deep'"),
    ({"architecture": [LAYER, {**LAYER, "norm": {"norm_cls": "batch"}}]}, ValueError, "architecture[1].norm"),
    ({"head": {"head_cls": "linear"}}, ValueError, "head.head_cls = 'linear': no such head"),
    ({"architecture": [LAYER, {**LAYER, "mixer": {"mixer_cls": "window_attention", "windw_size": 4}}]}, TypeError,
     "architecture[1].mixer: mixer 'window_attention' takes no option 'windw_size' (it takes: window_size, "
     "num_heads)"),
    ({"architecture": [LAYER, {**LAYER, "mlp": {"mlp_cls": "glu", "activation": "silu"}}]}, TypeError,
     "architecture[1].mlp: mlp 'glu' takes no option 'activation'"),
    ({"architecture": [LAYER, {**LAYER, "dropout": 0.2}]}, TypeError, "architecture[1]: block 'sequential' takes "
     "no option 'dropout'"),
    ({"n_layer": 2}, TypeError, "config: unknown key 'n_layer'"),
    ({"architecture": [LAYER, LAYER, LAYER]}, ValueError,
     "architecture: a list of 3 layer dicts for n_layers = 2"),
    ({"architecture": [LAYER, {**LAYER, "mixer": [{"mixer_cls": "window_attention", "window_size": -3}]}]},
     ValueError, "architecture[1].mixer[0] (window_attention): window_size = -3: must be at least 1"),
    ({"architecture": [LAYER, {**LAYER, "mixer": {"mixer_cls": "causal_attention", "num_heads": 3}}]}, ValueError,
     "architecture[1].mixer (causal_attention): num_heads = 3: must divide d_model = 32"),
    ({"num_heads": 3}, ValueError, "architecture[0].mixer (linear_attention): num_heads (the model's) = 3: must "
     "divide d_model = 32"),
    ({"architecture": [LAYER, {**LAYER, "mlp": {"mlp_cls": "glu", "act_fn": "swish"}}]}, ValueError,
     "architecture[1].mlp (glu): act_fn = 'swish': one of gelu, gelu_tanh, relu, sigmoid, silu"),
    ({"window_size": 0}, ValueError, "window_size = 0: must be at least 1"),
    ({"architecture": [LAYER, {**LAYER, "mixer": []}]}, ValueError, "architecture[1].mixer = []"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_a_bad_config_raises_one_error_naming_the_place(change, error, message):
    cfg = {**SIZES, "n_layers": 2, "architecture": [LAYER, LAYER], **change}
    with pytest.raises(error) as e:
        AGIFORMER.from_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_register_a_mixer_at_run_time():
    """A causal depthwise convolution over the last 3 positions, with its own streaming state."""

    class ShortConv(nn.Module):
        def __init__(self, ctx: Context, *, kernel_size: int = 3):
            super().__init__()
            if kernel_size < 1:
                raise ValueError(f"kernel_size = {kernel_size}: must be at least 1")
            self.conv = nn.Conv1d(ctx.d_model, ctx.d_model, kernel_size, groups=ctx.d_model)

        def forward(self, x):
            k = self.conv.kernel_size[0]
            return self.conv(nn.functional.pad(x.transpose(1, 2), (k - 1, 0))).transpose(1, 2)

        def prefill(self, x):
            k = self.conv.kernel_size[0]
            tail = nn.functional.pad(x, (0, 0, k - 1, 0))[:, -(k - 1):] if k > 1 else x[:, :0]
            return self(x), [tail]

        def step(self, x, state, pos):
            window = torch.cat([state[0], x[:, None]], dim=1)
            state[0] = window[:, 1:]
            return self(window)[:, -1]

    MIXERS.register("short_conv")(ShortConv)
    try:
        with pytest.raises(ValueError, match="mixer 'short_conv' is registered already"):
            MIXERS.register("short_conv")(ShortConv)
        layer = {"block_cls": "sequential", "mixer": [{"mixer_cls": "short_conv", "kernel_size": 3},
                                                       {"mixer_cls": "linear_attention"}]}
        torch.manual_seed(0)
        m = AGIFORMER.from_config({**SIZES, "architecture": layer}, backend="reference").double().eval()
        assert m.layers[0].short_conv.conv.kernel_size == (3,)
        assert_incremental_equals_recompute(m)
        with pytest.raises(ValueError, match=r"architecture.mixer\[0\] \(short_conv\): kernel_size = 0"):
            AGIFORMER.from_config({**SIZES, "architecture": {**layer, "mixer": [{"mixer_cls": "short_conv",
                                                                                   "kernel_size": 0}]}})
    finally:
        MIXERS.unregister("short_conv")
    assert "short_conv" not in MIXERS


# causal attention -----------------------------------------------------------------------------------

def test_causal_attention_kv_cache_grows_and_sdpa_agrees(monkeypatch):
    ctx = Context(d_model=32, num_heads=2, window_size=4, patch_size=4, dropout=0.0, thinking_steps=1,
                  backend="reference")
    torch.manual_seed(0)
    m = CausalAttention(ctx).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = m(x)
    y, state = m.prefill(x[:, :5])
    assert state[0].shape == (2, 5, 2, 16)  # the cache holds the prompt
    outs = [m.step(x[:, t], state, t) for t in range(5, 9)]
    assert state[0].shape[1] == 10  # doubled once when full, not per step
    assert_close("prefill", y, full[:, :5])
    assert_close("steps", torch.stack(outs, 1), full[:, 5:])
    monkeypatch.setattr(mixers, "SDPA_MIN_CPU_LENGTH", 4)  # no backend named: SDPA's flash kernel from L = 4
    m.backend = None
    assert_close("sdpa", m(x), full)
    q, k, v = m._split(x)
    assert _sdpa(q, k, v) is not None


# checkpoints and the command lines -----------------------------------------------------------------

def test_a_checkpoint_rebuilds_its_architecture_or_names_the_missing_component(tmp_path):
    torch.manual_seed(0)
    cfg = {**flavors.flavor("tiny-mixed"), "d_model": 32, "num_heads": 2}
    cfg["architecture"][1]["mixer"]["num_heads"] = 1
    model = AGIFORMER.from_config(cfg, backend="reference").eval()
    checkpoint.save(tmp_path / "m.pt", model=model.state_dict(), config=model.config)
    loaded, _ = checkpoint.load_model(tmp_path / "m.pt", backend="reference")
    assert loaded.config == model.config
    x = torch.randint(0, 256, (1, 24))
    assert torch.equal(loaded(x, x), model(x, x))

    foreign = json.loads(json.dumps(model.config))
    foreign["architecture"][2]["mixer"] = {"mixer_cls": "retention"}
    checkpoint.save(tmp_path / "foreign.pt", model=model.state_dict(), config=foreign)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(tmp_path / "foreign.pt")
    assert "architecture[2].mixer.mixer_cls = 'retention': no such mixer" in str(e.value)
    assert "not registered" in str(e.value) and "\n" not in str(e.value)


def test_train_the_shipped_example_then_evaluate_generate_inspect(tmp_path, text_file, capsysbinary):
    """The same command as `python -m agiformer.train --architecture tiny-mixed`, on a small corpus."""
    example = flavors.path("tiny-mixed")
    train.main(["--architecture", str(example), "--data", str(text_file), "--out", str(tmp_path), "--steps", "3",
                "--seq-len", "64", "--batch-size", "4", "--eval-batch-size", "8", "--eval-every", "100",
                "--backend", "reference", "--device", "cpu", "--quiet"])
    last = str(tmp_path / "last.pt")
    ckpt = checkpoint.read(last)
    assert ckpt["config"]["architecture"][2]["block_cls"] == "parallel"
    model, _ = checkpoint.load_model(last, backend="reference")
    assert model.config == AGIFORMER.from_config(flavors.flavor("tiny-mixed")).config

    evaluate.main([last, "--backend", "reference", "--quiet", "--device", "cpu"])
    assert "bits/byte" in capsysbinary.readouterr().out.decode()
    generate.main([last, "--prompt", "alpha beta", "-n", "9", "--backend", "reference", "--quiet", "--device", "cpu"])
    assert capsysbinary.readouterr().out == b"alpha beta" + api_generate(model, b"alpha beta", 9) + b"\n"
    inspect.main([last, "--prompt", "gamma delta epsilon", "--json", "--backend", "reference", "--device", "cpu"])
    report = json.loads(capsysbinary.readouterr().out.decode())
    assert [layer["block"] for layer in report["layers"]] == ["hybrid", "sequential", "parallel"]
    assert set(report["layers"][2]["mixers"]) == {"causal"} and report["reasoning"] == []

    with pytest.raises(SystemExit) as done:  # resuming with another architecture is refused
        train.main(["--architecture", "tiny", "--data", str(text_file), "--out", str(tmp_path), "--steps", "4",
                    "--resume", "auto", "--backend", "reference", "--device", "cpu", "--quiet"])
    err = capsysbinary.readouterr().err.decode()
    assert done.value.code == 2 and "--architecture tiny" in err, err


@pytest.mark.parametrize("content, named", [
    ([{"block_cls": "hybrid"}, {"block_cls": "nope"}], "architecture[1].block_cls = 'nope'"),
    ({"block_cls": "sequential", "mixer": {"mixer_cls": "window_attention", "window_size": -1}},
     "window_size = -1: must be at least 1"),
    ("not json", "not JSON"),
], ids=["unknown block", "negative window", "not json"])
def test_train_refuses_a_bad_architecture_file_before_loading(tmp_path, text_file, content, named, capsysbinary):
    spec = tmp_path / "arch.json"
    spec.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as done:
        train.main(["--architecture", str(spec), "--data", str(text_file), "--out", str(tmp_path / "run"), *TINY,
                    "--n-layers", "2", "--steps", "1"])
    err = capsysbinary.readouterr().err.decode().strip().splitlines()[-1]
    assert done.value.code == 2 and f"--architecture {spec}" in err and named in err, err
    assert not (tmp_path / "run").exists()


def test_train_takes_a_list_of_layers_as_the_number_of_layers(tmp_path, text_file):
    spec = tmp_path / "arch.json"
    spec.write_text(json.dumps([{"block_cls": "parallel", "mixer": {"mixer_cls": "linear_attention"}}] * 2))
    cfg, _ = train.parse_args(["--architecture", str(spec), "--data", str(text_file), "--out", str(tmp_path / "run"),
                               "--d-model", "32", "--num-heads", "2", "--seq-len", "64", "--batch-size", "2",
                               "--steps", "1", "--backend", "reference", "--device", "cpu"])
    assert cfg["n_layers"] == 2
    train.train(cfg, quiet=True)
    assert checkpoint.read(tmp_path / "run" / "last.pt")["config"]["n_layers"] == 2
