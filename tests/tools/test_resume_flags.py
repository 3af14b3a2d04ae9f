"""Flags given with --resume: applied from the resumed step on and recorded in the checkpoint, or refused;
never silently dropped."""

import shutil

import pytest

from agiformer import train
from agiformer.checkpoint import read
from tests.tools.tiny_runs import TINY, metrics, run_train


@pytest.fixture
def run(tmp_path, tiny_run):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def test_lr_and_steps_given_with_resume_apply_and_are_recorded(run, text_file):
    """--lr was ignored on resume: the schedule now runs from the new peak, and last.pt says what changed."""
    before = read(run / "last.pt")
    run_train(run, text_file, "--steps", "6", "--eval-every", "100", "--lr", "5e-4", "--weight-decay", "0.1",
              "--resume", "auto")
    after = read(run / "last.pt")
    cfg = after["train_config"]
    assert (cfg["lr"], cfg["steps"], cfg["weight_decay"]) == (5e-4, 6, 0.1)
    assert after["changes"] == [{"step": 3, "steps": {"from": 3, "to": 6}, "lr": {"from": 2e-3, "to": 5e-4},
                                 "weight_decay": {"from": 0.01, "to": 0.1}}]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["lr"] == before["scheduler"]["_last_lr"][0]  # the first three steps as they were
    for r in rows[3:]:  # the logged rate is the next step's: 5e-4 times the 6-step schedule's factor
        assert r["lr"] == pytest.approx(5e-4 * train.lr_factor(r["step"], cfg["warmup"], 6, cfg["min_lr_ratio"]))
    assert all(g["weight_decay"] == 0.1 for g in after["optimizer"]["param_groups"])


def test_only_what_changed_is_recorded(run, text_file):
    run_train(run, text_file, "--steps", "4", "--eval-every", "100", "--resume", "auto")
    run_train(run, text_file, "--steps", "5", "--eval-every", "100", "--resume", "auto")
    assert read(run / "last.pt")["changes"] == [{"step": 3, "steps": {"from": 3, "to": 4}},
                                                {"step": 4, "steps": {"from": 4, "to": 5}}]


@pytest.mark.parametrize("flags, named", [
    (["--d-model", "64", "--num-heads", "2"], "--d-model 64"),
    (["--thinking-steps", "2"], "--thinking-steps 2"),
    (["--seed", "1"], "--seed 1"),
    (["--preset", "v1"], "--preset v1"),
    (["--steps", "2"], "--steps 2"),  # the checkpoint is at step 3
])
def test_flags_a_resumed_run_cannot_honour_are_refused(run, text_file, flags, named, capsysbinary):
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as done:
        train.main(["--data", str(text_file), "--out", str(run), *TINY, "--steps", "3", *flags, "--resume", "auto"])
    err = capsysbinary.readouterr().err.decode(errors="replace")
    assert done.value.code == 2 and named in err.splitlines()[-1], err
    assert (run / "last.pt").read_bytes() == before


def test_other_data_is_refused(run, tmp_path, capsysbinary):
    other = tmp_path / "other.txt"
    other.write_bytes(b"other text " * 500)
    with pytest.raises(SystemExit):
        train.main(["--data", str(other), "--out", str(run), *TINY, "--resume", "auto"])
    assert b"--data" in capsysbinary.readouterr().err.splitlines()[-1]
