"""Training the hierarchical autoencoder: exact resume, the two stages, metrics and samples, MLflow, flag
checks, and the evaluate / generate tools on what it wrote."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from agiformer.checkpoint import read
from agiformer.hierarchical import evaluate, generate, train
from tests.tools.tiny_runs import word_corpus

# The minute test config on 32-byte windows: a step takes milliseconds.
FLAGS = ["--config", "test", "--seq-len", "32", "--batch-size", "2", "--eval-batch-size", "8", "--log-every", "1",
         "--eval-every", "4", "--eval-bytes", "200", "--checkpoint-every", "3", "--device", "cpu"]
TRAINING_KEYS = ("step", "lr", "loss", "reconstruction", "commitment", "entropy_lm", "causal_lm", "l1/recon_acc",
                 "l1/bytes_per_code", "val_bpb", "val_l1/recon_acc", "val_l1/bytes_per_code")


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    """Sample artifacts as at full size, on fewer bytes: the free-running decoders cost a pass per byte."""
    monkeypatch.setattr(train, "SAMPLE_ROWS", 1)
    monkeypatch.setattr(train, "SAMPLE_BYTES", 4)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 20 KB of varied text: val and test splits of about 1 KB each."""
    return word_corpus(tmp_path_factory.mktemp("data") / "corpus.txt", 3000)


def run(out: Path, text_file: Path, *extra: str) -> dict:
    cfg, _ = train.parse_args(["--data", str(text_file), "--out", str(out), *FLAGS, *extra])
    return train.train(cfg, quiet=True)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, text_file) -> Path:
    """A finished 6-step base stage (validations at 4 and 6, checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("base")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it run (conftest): sums in the same order
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(train, "SAMPLE_ROWS", 1)
            m.setattr(train, "SAMPLE_BYTES", 4)
            run(out, text_file, "--steps", "6")
    finally:
        torch.set_num_threads(threads)
    return out


def test_resume_reproduces_the_uninterrupted_run(base_run, tmp_path, text_file):
    """3 steps, then --resume auto to 6: every loss, metric and validation of steps 4 to 6, and the final weights,
    optimizer and EMA buffers, equal the uninterrupted run's bit for bit."""
    parts = tmp_path / "parts"
    run(parts, text_file, "--steps", "3")
    run(parts, text_file, "--steps", "6", "--resume", "auto")
    whole_rows, parts_rows = rows(base_run), rows(parts)
    assert [r["step"] for r in parts_rows] == list(range(1, 7))
    # step 3 ended the 3-step run, which validated it: the training keys must still agree
    assert [[r.get(k) for k in TRAINING_KEYS if not (r["step"] == 3 and k.startswith("val_"))] for r in parts_rows] \
        == [[r.get(k) for k in TRAINING_KEYS if not (r["step"] == 3 and k.startswith("val_"))] for r in whole_rows]
    a, b = read(base_run / "last.pt"), read(parts / "last.pt")
    assert a["step"] == b["step"] == 6 and a["stage"] == b["stage"] == "base"
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights or buffers differ"
    assert all(torch.equal(x, y) for k in a["optimizer"]["state"]
               for x, y in zip(a["optimizer"]["state"][k].values(), b["optimizer"]["state"][k].values()))
    assert a["config"]["levels"][0]["d_model"] == 16  # the complete model config travels with the checkpoint


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(base_run, tmp_path, text_file, monkeypatch):
    """SIGINT during step 3's forward: the step is finished, last.pt saved and the run stops; --resume auto then
    writes the uninterrupted run's rows and weights."""
    real, calls = train.HierarchicalAutoencoder.forward, []

    def forward(self, *args, **kwargs):
        if self.training:
            calls.append(1)
            if len(calls) == 4:  # the warm-up's forward, then steps 1, 2 and 3
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(train.HierarchicalAutoencoder, "forward", forward)
        with pytest.raises(KeyboardInterrupt):
            run(out, text_file, "--steps", "6")
    assert read(out / "last.pt")["step"] == 3
    run(out, text_file, "--steps", "6", "--resume", "auto")
    assert [[r.get(k) for k in TRAINING_KEYS] for r in rows(out)] == \
        [[r.get(k) for k in TRAINING_KEYS] for r in rows(base_run)]
    a, b = read(base_run / "last.pt")["model"], read(out / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_samples_and_base_files(base_run):
    """metrics.jsonl / .csv carry the stage's losses and the per-level metrics, validation rows the whole split's
    bits per byte; base.pt holds the model; samples/ the reconstructions at each validation."""
    last = rows(base_run)[-1]
    assert last["step"] == 6 and 0 < last["val_bpb"] < 20
    assert 0 <= last["val_l1/recon_acc"] <= 1 and last["val_l1/bytes_per_code"] >= 1
    header = (base_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "reconstruction", "l1/recon_acc", "l1/bytes_per_code", "val_bpb"} <= set(header)
    assert sorted(p.name for p in (base_run / "samples").iterdir()) == ["step0000004-reconstruction.txt",
                                                                        "step0000006-reconstruction.txt"]
    assert "--- reconstruction" in (base_run / "samples" / "step0000006-reconstruction.txt").read_text()
    base = read(base_run / "base.pt")
    assert base["stage"] == "base" and base["model"].keys() == read(base_run / "last.pt")["model"].keys()


def test_top_stage_trains_the_top_lm_alone(base_run, tmp_path, text_file):
    """--stage top: the top LM's weights move; every weight and buffer of the base stays as base.pt has it."""
    out = tmp_path / "top"
    row = run(out, text_file, "--stage", "top", "--base", str(base_run / "base.pt"), "--steps", "2",
              "--eval-every", "2")
    assert row["step"] == 2 and "top_lm" in row and "val_bpb" in row
    base, top = read(base_run / "base.pt")["model"], read(out / "last.pt")["model"]
    assert top.keys() == base.keys()
    moved = [k for k in base if not torch.equal(base[k], top[k])]
    assert moved and all(k.startswith("top_lm.") for k in moved), moved
    assert (out / "samples" / "step0000002-continuation.txt").exists()
    assert not (out / "base.pt").exists()


def test_evaluate_and_generate_read_a_checkpoint(base_run, text_file, capsys):
    """The tools load what training wrote: evaluate prints bits per byte and each level's metrics, and its
    result equals the run's last validation; generate prints new bytes."""
    model, ckpt = evaluate.load_model(str(base_run / "last.pt"))
    from agiformer.data import load_corpus

    result = evaluate.evaluate(model, load_corpus(str(text_file)).val, seq_len=32, batch_size=8)
    assert result["bpb"] == pytest.approx(rows(base_run)[-1]["val_bpb"], rel=1e-6)
    evaluate.main([str(base_run / "last.pt"), "--max-bytes", "100", "--quiet"])
    printed = capsys.readouterr().out
    assert "bits/byte over 100 bytes" in printed and "l1/recon_acc" in printed
    generate.main([str(base_run / "last.pt"), "--prompt", "al", "-n", "3", "--quiet"])
    assert len(capsys.readouterr().out.encode("utf-8", "surrogateescape")) >= 1


def test_mlflow_logs_batched_metrics_and_sample_artifacts(tmp_path, text_file, monkeypatch):
    """--mlflow --project p: a run in the file store ./mlruns/p with every row's metrics and the samples."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the run sets: the test's client reads it too
    run(tmp_path / "out", text_file, "--steps", "2", "--eval-every", "2", "--mlflow", "--project", "p")
    store = tmp_path / "mlruns" / "p"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert client.get_metric_history(run_id, "val_bpb")[0].step == 2
    assert runs[0].data.params["config"] == "test"
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step0000002-reconstruction.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--stage", "top"], "--stage top: needs --base"),
    (["--config", "no-such-config"], "--config no-such-config"),
    (["--base", "x.pt"], "--base x.pt: only for --stage top"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
])
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_refuses_another_model_or_seed(base_run, tmp_path, text_file):
    """A resumed run keeps its model and data stream: another --seed is refused, the same --config named again
    is accepted."""
    import shutil

    from agiformer.errors import UsageError

    out = tmp_path / "copy"
    shutil.copytree(base_run, out)
    with pytest.raises(UsageError, match="--seed 1"):
        run(out, text_file, "--steps", "7", "--resume", "auto", "--seed", "1")
    with pytest.raises(UsageError, match="a resumed run keeps it"):
        run(out, text_file, "--steps", "7", "--resume", "auto", "--stage", "top", "--base", str(out / "base.pt"))
    assert run(out, text_file, "--steps", "7", "--resume", "auto", "--eval-every", "100")["step"] == 7
