"""Tiny training runs for the tool tests: a model of under a million parameters on the reference ops."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Under a million parameters on the reference ops: a step takes tens of milliseconds.
TINY = ["--d-model", "32", "--n-layers", "1", "--num-heads", "2", "--window-size", "4", "--thinking-steps", "1",
        "--seq-len", "64", "--batch-size", "4", "--eval-batch-size", "8", "--log-every", "1", "--backend", "reference",
        "--device", "cpu"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_train(out: Path, text_file: Path, *extra: str) -> dict:
    from agiformer import train

    cfg, _ = train.parse_args(["--data", str(text_file), "--out", str(out), *TINY, *extra])
    return train.train(cfg, quiet=True)
