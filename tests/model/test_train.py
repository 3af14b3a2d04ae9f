"""Data, training (resume exactness, Ctrl-C, 2-process DDP), evaluation over a whole split, and the CLIs."""

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from agiformer import AGIFORMER, data, evaluate, generate, inspect, train
from agiformer.checkpoint import load_model, read
from tests.tools.tiny_runs import word_corpus

REPO = Path(__file__).resolve().parents[2]
TINY = ["--d-model", "32", "--n-layers", "1", "--num-heads", "2", "--window-size", "4", "--thinking-steps", "1",
        "--seq-len", "64", "--eval-batch-size", "8", "--log-every", "1", "--backend", "reference"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 40 KB of varied text: val and test splits of about 2 KB each."""
    return word_corpus(tmp_path_factory.mktemp("data") / "corpus.txt", 6000)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_train(out: Path, text_file: Path, *extra: str) -> dict:
    cfg, _ = train.parse_args(["--data", str(text_file), "--out", str(out), *TINY, *extra])
    return train.train(cfg, quiet=True)


# data ---------------------------------------------------------------------------------------------

def test_stdlib_corpus_is_split_by_position():
    c = data.load_corpus("stdlib")
    n = len(c.train) + len(c.val) + len(c.test)
    assert len(c.train) == int(n * 0.9) and len(c.val) == int(n * 0.95) - int(n * 0.9)
    first = data.stdlib_files()[0].read_bytes()
    assert bytes(c.train[: len(first)].tolist()) == first


def test_enwik8_from_local_zip_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("AGIFORMER_DATA", raising=False)
    raw = bytes(range(256)) * (data.ENWIK8_SIZE // 256) + bytes(data.ENWIK8_SIZE % 256)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", raw)
    c = data.load_corpus("enwik8", str(tmp_path), download=False)
    assert (len(c.train), len(c.val), len(c.test)) == (90_000_000, 5_000_000, 5_000_000)
    assert int(c.val[0]) == raw[90_000_000] and int(c.test[-1]) == raw[-1]
    with pytest.raises(FileNotFoundError, match="enwik8"):
        data.load_corpus("enwik8", str(tmp_path / "missing"), download=False)


def test_folder_corpus_and_random_windows(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"B" * 900)
    (tmp_path / "a.txt").write_bytes(b"A" * 900)
    c = data.load_corpus(str(tmp_path))
    assert bytes(c.train[:3].tolist()) == b"AAA" and len(c.train) == int(1801 * 0.9)
    whole = data.RandomWindows(c.train, 16, 6, seed=1).next()
    ranks = [data.RandomWindows(c.train, 16, 3, seed=1, rank=r, world_size=2).next() for r in range(2)]
    assert torch.equal(torch.cat(ranks), whole)


# evaluation ---------------------------------------------------------------------------------------

def test_bits_per_byte_scores_the_whole_split_once():
    torch.manual_seed(0)
    m = AGIFORMER(d_model=32, n_layers=1, num_heads=2, window_size=4, thinking_steps=1, dropout=0.0,
                  backend="reference").double()
    split = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    bpb, n = evaluate.bits_per_byte(m, split, seq_len=64, batch_size=3)
    assert n == 1000 - 4  # every byte from the first patch on, up to the last whole patch
    # brute force: one window per 60 new bytes, v1 alignment, plain cross-entropy of the logits
    total, count = 0.0, 0
    for start in range(0, 1001 - 8 + 1, 60):
        w = split[start : start + 64].long()[None]
        k = (w.shape[1] - 4) // 4 * 4
        with torch.no_grad():
            logits = m(w[:, :k], w[:, 4 : 4 + k])
        total += float(F.cross_entropy(logits.reshape(-1, 256), w[0, 4 : 4 + k], reduction="sum"))
        count += k
    assert count == n
    assert abs(bpb - total / count / math.log(2)) < 1e-9
    assert abs(evaluate.bits_per_byte(m, split, seq_len=64, batch_size=7)[0] - bpb) < 1e-9


# training -----------------------------------------------------------------------------------------

def test_lr_schedule():
    assert train.lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert train.lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert train.lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert train.lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_resume_after_ctrl_c_continues_exactly(tmp_path, text_file, monkeypatch):
    """Dropout on: an interrupted + resumed run logs the same losses and ends with the same weights."""
    common = ["--steps", "5", "--eval-every", "2", "--checkpoint-every", "100", "--dropout", "0.2"]
    run_train(tmp_path / "a", text_file, *common)

    real_next, calls = data.RandomWindows.next, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(data.RandomWindows, "next", interrupted)
    with pytest.raises(KeyboardInterrupt):  # raised inside step 4: that step is undone, steps 1-3 saved
        run_train(tmp_path / "b", text_file, *common)
    assert read(tmp_path / "b" / "last.pt")["step"] == 3
    monkeypatch.setattr(data.RandomWindows, "next", real_next)
    run_train(tmp_path / "b", text_file, *common, "--resume", "auto")

    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"] and ra.get("val_bpb") == rb.get("val_bpb")
    wa, wb = read(tmp_path / "a" / "last.pt")["model"], read(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path, text_file):
    common = ["--data", str(text_file), *TINY, "--steps", "3", "--eval-every", "100", "--dropout", "0", "--quiet",
              "--device", "cpu"]  # two processes on one CPU, wherever the test runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "agiformer.train", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                   check=True, env=env, cwd=REPO, timeout=180)
    run_train(tmp_path / "one", text_file, "--steps", "3", "--eval-every", "100", "--dropout", "0", "--batch-size", "4",
              "--device", "cpu")
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert ddp[-1]["val_bpb"] == pytest.approx(one[-1]["val_bpb"], rel=1e-5)
    wa, wb = read(tmp_path / "ddp" / "last.pt")["model"], read(tmp_path / "one" / "last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


# command lines ------------------------------------------------------------------------------------

def test_train_then_evaluate_generate_inspect(tmp_path, text_file, capsysbinary):
    train.main(["--data", str(text_file), "--out", str(tmp_path), *TINY, "--steps", "3", "--eval-every", "100",
                "--quiet"])
    ckpt = read(tmp_path / "last.pt")
    assert {"model", "optimizer", "scheduler", "rng", "sampler", "step", "config", "train_config"} <= set(ckpt)
    rows = metrics(tmp_path)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == len(rows) + 1
    last = str(tmp_path / "last.pt")

    # training validates under bf16 autocast on a GPU (its default), so the evaluation does too
    evaluate.main([last, "--backend", "reference", "--quiet", *(["--amp"] if torch.cuda.is_available() else [])])
    line = capsysbinary.readouterr().out.decode()
    assert f"{rows[-1]['val_bpb']:.4f} bits/byte" in line

    generate.main([last, "--prompt", "alpha beta", "-n", "9", "--backend", "reference", "--quiet"])
    out = capsysbinary.readouterr().out
    model, _ = load_model(last, backend="reference")
    from agiformer.generation import generate as api_generate

    assert out == b"alpha beta" + api_generate(model, b"alpha beta", 9) + b"\n"

    inspect.main([last, "--prompt", "gamma delta epsilon", "--json", "--backend", "reference"])
    report = json.loads(capsysbinary.readouterr().out.decode())
    assert report["patches"] == 4 and len(report["layers"]) == 1 and len(report["reasoning"]) == 1
    assert 0 < report["layers"][0]["window_share"] < 1
    assert 0 < report["reasoning"][0]["gate_mean"] < 1

    with pytest.raises(SystemExit):
        generate.main([last, "--prompt", "ab", "--backend", "reference"])
    assert "fewer than patch_size = 4 bytes" in capsysbinary.readouterr().err.decode()
