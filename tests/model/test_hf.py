"""The Hugging Face model: config and weights round trips, logits that see only the bytes before each byte,
the loss of training, export of our checkpoints and of original v1 state_dicts (needs the hf extra)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from agiformer import AGIFORMER, checkpoint, export  # noqa: E402
from agiformer.generation import generate  # noqa: E402
from agiformer.hf import AgiformerConfig, AgiformerForCausalLM  # noqa: E402
from benchmarks.baselines import v1  # noqa: E402

# Two different layers (v1's hybrid, then full causal attention) so every mixer's causality is exercised.
TINY = {"d_model": 32, "n_layers": 2, "num_heads": 2, "window_size": 2, "thinking_steps": 1, "dropout": 0.0,
        "architecture": [{"block_cls": "hybrid"},
                         {"block_cls": "sequential", "mixer": {"mixer_cls": "causal_attention"},
                          "mlp": {"mlp_cls": "glu", "act_fn": "silu"}, "norm": {"norm_cls": "rms"}}]}


def tiny_model(seed: int = 0) -> AGIFORMER:
    torch.manual_seed(seed)
    return AGIFORMER.from_config(TINY, backend="reference").eval()


def byte_logprobs_reference(model: AGIFORMER, text: bytes, j: int) -> torch.Tensor:
    """log p(byte j = · | text[:j]) ``[256]`` from a run that is given only ``text[:j]``: the complete patches
    before j through the model, the bytes of j's own patch before it teacher-forced into the head."""
    P = model.patch_size
    k = j // P
    before = list(text[k * P : j])
    x = torch.tensor([list(text[: k * P])])
    target = torch.tensor([list(text[P : k * P]) + before + [0] * (P - len(before))])
    with torch.no_grad():
        return model(x, target)[0, -1, len(before)].double().log_softmax(-1)


def test_logits_at_t_are_the_next_byte_given_bytes_up_to_t_and_the_loss_is_training_loss():
    model = tiny_model()
    hf = AgiformerForCausalLM.from_agiformer(model).eval()
    text = bytes(range(60, 60 + 23))  # 23 bytes: the last patch is incomplete
    ids = torch.tensor([list(text)])
    out = hf(ids)
    assert out.logits.shape == (1, 23, 256) and out.loss is None
    assert not out.logits[0, :3].any()  # the first patch's bytes: no prediction
    for t in range(3, 23):  # logits[t] predicts byte t + 1, the byte after the input (t = 22) included
        ref = byte_logprobs_reference(model, text + b"?", t + 1)
        torch.testing.assert_close(out.logits[0, t].double().log_softmax(-1), ref, atol=1e-5, rtol=0)
    seq = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(seq, labels=seq).loss, model.sequence_loss(seq), atol=1e-5, rtol=0)


def test_save_pretrained_and_auto_classes_reload_identical_logits(tmp_path):
    hf = AgiformerForCausalLM.from_agiformer(tiny_model(), seq_len=64).eval()
    hf.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, AgiformerConfig) and config.seq_len == 64
    assert AGIFORMER.from_config(config.model_config()).config == hf.model.config  # the architecture round-trips
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, backend="reference").eval()
    assert isinstance(again, AgiformerForCausalLM)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


def test_hf_generate_is_our_greedy_generation():
    model = tiny_model()
    hf = AgiformerForCausalLM.from_agiformer(model).eval()
    prompt = b"hello wor"
    out = hf.generate(torch.tensor([list(prompt)]), max_new_tokens=9, do_sample=False)
    assert bytes(out[0, len(prompt) :].tolist()) == generate(model, prompt, 9)


def test_bad_inputs_name_the_argument():
    hf = AgiformerForCausalLM.from_agiformer(tiny_model()).eval()
    with pytest.raises(ValueError, match="input_ids: 3 bytes"):
        hf(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="input_ids: bytes"):
        hf(torch.tensor([[1, 2, 3, 300]]))
    with pytest.raises(ValueError, match="attention_mask: only right padding"):
        hf(torch.ones(1, 8, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))


def test_export_of_our_checkpoint_and_of_an_original_v1_state_dict(tmp_path, capsys):
    model = tiny_model()
    checkpoint.save(tmp_path / "last.pt", model=model.state_dict(), config=model.config,
                    train_config={"seq_len": 48})
    export.main([str(tmp_path / "last.pt"), str(tmp_path / "ours")])
    assert str(tmp_path / "ours") in capsys.readouterr().out
    ours = AgiformerForCausalLM.from_pretrained(tmp_path / "ours", backend="reference").eval()
    assert ours.config.seq_len == 48
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours.model(x, y), model(x, y))

    torch.manual_seed(3)
    original = v1.AGIFORMER(d_model=32, n_layers=1, num_heads=2, window_size=4, thinking_steps=2).eval()
    torch.save(original.state_dict(), tmp_path / "best_model.pth")
    export.main([str(tmp_path / "best_model.pth"), str(tmp_path / "v1"), "--num-heads", "2", "--window-size", "4",
                 "--thinking-steps", "2"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v1", backend="reference").eval()
    assert loaded.config.seq_len == 1024 and loaded.config.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, y), original(x, y), atol=1e-5, rtol=0)


def test_export_refuses_what_cannot_work_in_one_line(tmp_path, capsys):
    model = tiny_model()
    checkpoint.save(tmp_path / "last.pt", model=model.state_dict(), config=model.config)
    (tmp_path / "file").write_text("")
    for argv, status, says in [([str(tmp_path / "missing.pt"), str(tmp_path / "o")], 1, "missing.pt: no such file"),
                               ([str(tmp_path / "last.pt"), str(tmp_path / "file")], 1, "a file, not a folder"),
                               ([str(tmp_path / "last.pt"), str(tmp_path / "o"), "--seq-len", "10"], 2,
                                "seq_len 10: must be a multiple")]:
        with pytest.raises(SystemExit) as done:
            export.main(argv)
        err = capsys.readouterr().err
        assert done.value.code == status and says in err.splitlines()[-1] and err.count("error:") == 1, err
