"""Tiny training runs for the tool tests: a model of under a million parameters on the reference ops."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Under a million parameters on the reference ops: a step takes tens of milliseconds.
TINY = ["--d-model", "32", "--n-layers", "1", "--num-heads", "2", "--window-size", "4", "--thinking-steps", "1",
        "--seq-len", "64", "--batch-size", "4", "--eval-batch-size", "8", "--log-every", "1", "--backend", "reference",
        "--device", "cpu"]


def word_corpus(path: Path, words: int) -> Path:
    """``words`` seeded words of varied text (about 6.7 bytes each) written to ``path``: a corpus whose val and
    test splits are 5% each."""
    import torch

    vocab = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(vocab), (words,), generator=g).tolist()
    path.write_bytes(b" ".join(vocab[i] + (b".\n" if i == 3 else b"") for i in idx))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_train(out: Path, text_file: Path, *extra: str) -> dict:
    from agiformer import train

    cfg, _ = train.parse_args(["--data", str(text_file), "--out", str(out), *TINY, *extra])
    return train.train(cfg, quiet=True)
