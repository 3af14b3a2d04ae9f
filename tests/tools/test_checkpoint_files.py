"""Checkpoint files: a checksum verified on every read; a damaged, truncated, empty, foreign or missing file
refused in one line naming it; interrupted saves leave nothing behind."""

import shutil
import warnings
import zipfile

import pytest
import torch

from agiformer import checkpoint, evaluate, generate, inspect
from agiformer.errors import CheckpointError
from benchmarks.baselines import v1
from tests.tools.tiny_runs import run_train


def changed_tensor_bytes(src, dst):
    """dst: src with one byte flipped in the middle of its largest tensor record (zip entries are stored)."""
    shutil.copy(src, dst)
    with zipfile.ZipFile(dst) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(dst.read_bytes())
    header = 30 + int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little") + \
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    raw[info.header_offset + header + info.file_size // 2] ^= 0x40
    dst.write_bytes(bytes(raw))


def weights_file(path):
    """The safetensors file beside checkpoint ``path`` that it names."""
    (found,) = path.parent.glob(path.name + ".*.safetensors")
    return found


@pytest.fixture
def files(tmp_path, tiny_run):
    """One bad file of each kind, by the problem the error must name."""
    good = tiny_run / "last.pt"
    made = {}
    made["checksum mismatch"] = tmp_path / "changed.pt"
    changed_tensor_bytes(good, made["checksum mismatch"])
    shutil.copy(weights_file(good), tmp_path)  # the weights it names, unchanged
    made["truncated or damaged"] = tmp_path / "truncated.pt"
    made["truncated or damaged"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    made["empty"] = tmp_path / "empty.pt"
    made["empty"].write_bytes(b"")
    made["not a PyTorch checkpoint"] = tmp_path / "notes.txt"
    made["not a PyTorch checkpoint"].write_text("# a text file\nhello\n")
    made["not an AGIFORMER checkpoint"] = tmp_path / "foreign.pt"
    torch.save({"weights": {"w": torch.zeros(3)}}, made["not an AGIFORMER checkpoint"])
    made["holds a Tensor"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), made["holds a Tensor"])
    made["pickled model"] = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), made["pickled model"])
    made["no such file"] = tmp_path / "missing.pt"
    return made


PROBLEMS = ["checksum mismatch", "truncated or damaged", "empty", "not a PyTorch checkpoint",
            "not an AGIFORMER checkpoint", "holds a Tensor", "pickled model", "no such file"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_a_bad_file_is_refused_in_one_line_naming_it(files, problem, capsysbinary):
    path = files[problem]
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(path)
    assert str(path) in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)
    for tool in (evaluate, generate, inspect):  # the same from each command line: one line, no traceback
        with pytest.raises(SystemExit) as done:
            tool.main([str(path), "--backend", "reference", "--device", "cpu"])
        assert done.value.code == 1
        err = capsysbinary.readouterr().err.decode(errors="replace")
        assert err.count("\n") == 1 and str(path) in err and problem in err, err


def test_checksum_covers_every_tensor_and_value(tiny_run):
    ckpt = checkpoint.read(tiny_run / "last.pt")
    assert ckpt["checksum"].startswith("sha256:")
    body = {k: v for k, v in ckpt.items() if k != "checksum"}
    assert checkpoint.checksum(body) == ckpt["checksum"]
    body["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1e-7
    assert checkpoint.checksum(body) != ckpt["checksum"]
    body = {k: v for k, v in checkpoint.read(tiny_run / "last.pt").items() if k != "checksum"}
    body["step"] += 1
    assert checkpoint.checksum(body) != ckpt["checksum"]


def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path, tiny_run):
    """Written before checksums existed: nothing to verify it against, so it loads and says so; an original
    v1 state_dict never had one and loads silently."""
    ckpt = checkpoint.read(tiny_run / "last.pt")
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.warns(checkpoint.UnverifiedCheckpointWarning, match="old.pt: written without a checksum"):
        model, _ = checkpoint.load_model(tmp_path / "old.pt")
    assert model.config["d_model"] == 32
    torch.save(v1.AGIFORMER(d_model=32, n_layers=1, num_heads=2, window_size=4).state_dict(), tmp_path / "v1.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.load_model(tmp_path / "v1.pth", overrides=dict(num_heads=2, window_size=4))


def test_an_interrupted_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, step=1, model={"w": torch.ones(2)})
    before, files = path.read_bytes(), sorted(tmp_path.iterdir())
    real_save = torch.save

    def save_then_ctrl_c(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, step=2, model={"w": torch.zeros(2)})
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == files
    assert checkpoint.read(path)["step"] == 1


def test_training_removes_a_killed_saves_temporary_and_resumes(tmp_path, text_file, tiny_run):
    """A kill -9 during a save leaves last.pt.tmp: nothing reads it, and the next run in that folder deletes it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "last.pt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    run_train(out, text_file, "--steps", "3", "--eval-every", "100", "--resume", "auto")  # nothing left to train
    assert not (out / "last.pt.tmp").exists()
    assert checkpoint.read(out / "last.pt")["step"] == 3


def test_weights_are_safetensors_beside_the_checkpoint_and_read_back_in_order(tmp_path):
    from safetensors.torch import load_file

    model = v1.AGIFORMER(d_model=16, n_layers=1, num_heads=2, window_size=4)
    state = model.state_dict()
    checkpoint.save(tmp_path / "last.pt", model=state, optimizer={"state": {}, "param_groups": []}, step=7)
    weights = weights_file(tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", weights.name]
    on_disk = load_file(weights)  # any safetensors reader takes the weights
    assert on_disk.keys() == state.keys() and all(torch.equal(on_disk[k], v) for k, v in state.items())
    ckpt = checkpoint.read(tmp_path / "last.pt")
    assert list(ckpt["model"]) == list(state) and ckpt["step"] == 7
    assert "model" not in torch.load(tmp_path / "last.pt", weights_only=True)  # the .pt holds the rest


def test_a_damaged_or_missing_weights_file_is_refused_naming_it(tmp_path):
    checkpoint.save(tmp_path / "last.pt", model={"w": torch.arange(64.0)}, step=1)
    weights = weights_file(tmp_path / "last.pt")
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0x40  # inside the tensor's data: safetensors has no checksum, ours covers it
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="last.pt: checksum mismatch"):
        checkpoint.read(tmp_path / "last.pt")
    weights.write_bytes(bytes(raw[:20]))
    with pytest.raises(CheckpointError, match=f"its weights file {weights.name} is truncated or damaged"):
        checkpoint.read(tmp_path / "last.pt")
    weights.unlink()
    with pytest.raises(CheckpointError, match=f"its weights file {weights.name} is missing"):
        checkpoint.read(tmp_path / "last.pt")


def test_a_checkpoint_with_inline_weights_loads_unchanged(tmp_path, tiny_run):
    """Written before the weights moved to safetensors: one torch file holding everything, checksum included."""
    ckpt = checkpoint.read(tiny_run / "last.pt")
    torch.save(ckpt, tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = checkpoint.read(tmp_path / "old.pt")
    assert checkpoint.checksum(old) == checkpoint.checksum(ckpt)
    model, _ = checkpoint.load_model(tmp_path / "old.pt")
    new, _ = checkpoint.load_model(tiny_run / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), new.state_dict().values()))


def test_a_save_deletes_the_weights_it_replaced_unless_another_checkpoint_names_them(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, model={"w": torch.ones(2)}, step=1)
    first = weights_file(path)
    checkpoint.save(path, model={"w": torch.ones(2)}, step=2)
    assert not first.exists() and checkpoint.read(path)["step"] == 2
    shutil.copy(path, tmp_path / "keep.pt")  # a copy names the same weights
    kept = weights_file(path)
    checkpoint.save(path, model={"w": torch.zeros(2)}, step=3)
    assert kept.exists() and checkpoint.read(tmp_path / "keep.pt")["step"] == 2
    orphan = tmp_path / "best.pt.0123456789ab.safetensors"  # a save killed before its .pt was renamed
    orphan.write_bytes(b"x")
    checkpoint.save(tmp_path / "step3.ckpt", model={"w": torch.zeros(2)}, step=3)  # any name keeps its weights
    assert checkpoint.remove_leftovers(tmp_path) == [orphan]
    assert checkpoint.read(tmp_path / "step3.ckpt")["step"] == 3
    assert checkpoint.read(path)["step"] == 3 and checkpoint.read(tmp_path / "keep.pt")["step"] == 2
