"""Bits per byte, reconstruction accuracy and bytes per code of a hierarchical checkpoint over a whole split.

    python -m agiformer.hierarchical.evaluate runs/hier-tiny-top/last.pt          # its training data, val split
    python -m agiformer.hierarchical.evaluate runs/hier-tiny/base.pt --split test --max-bytes 100000

Bits per byte come from ``HierarchicalAutoencoder.nll``, a causal likelihood: byte t is scored from bytes
before it only, never from a reconstruction of the text that holds it. The split is cut into consecutive
windows of ``--seq-len`` bytes, each scored on its own (its first byte under the model's convention for a
row's first byte), so every byte is scored exactly once.
"""

from __future__ import annotations

from .. import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import contextlib
import math
import sys
import time
from typing import Optional

import torch
from tqdm import tqdm

from .. import _cli, checkpoint
from ..data import load_corpus
from ..errors import CheckpointError, UsageError
from ..evaluate import default_device
from . import HierarchicalAutoencoder


def load_model(path: str, *, device: torch.device | str = "cpu",
               backend: Optional[str] = None) -> tuple[HierarchicalAutoencoder, dict]:
    """(model in eval mode, checkpoint dict) from a checkpoint of ``agiformer.hierarchical.train`` (last.pt,
    best.pt or base.pt); ``CheckpointError`` naming the file when it holds no hierarchical model."""
    ckpt = checkpoint.read(path)
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of a model (no model weights or config in it)")
    if "stage" not in ckpt:
        raise CheckpointError(f"{path}: not a hierarchical autoencoder checkpoint (an AGIFORMER one? "
                              f"python -m agiformer.evaluate reads those)")
    try:
        model = HierarchicalAutoencoder(ckpt["config"], backend=backend)
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config and weights do not build the model ({checkpoint._one_line(e)})") \
            from e
    return model.to(device).eval(), ckpt


def windows(data: torch.Tensor, seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the whole ``seq_len``-byte windows that cover ``data`` from its start, [the shorter rest] or [])."""
    full = len(data) // seq_len
    rows = [data[i * seq_len : (i + 1) * seq_len] for i in range(full)]
    tail = [data[full * seq_len :]] if len(data) % seq_len else []
    return rows, tail


@torch.no_grad()
def evaluate(model: HierarchicalAutoencoder, data: torch.Tensor, *, seq_len: int = 256, batch_size: int = 32,
             device: torch.device | str = "cpu", max_bytes: Optional[int] = None, amp: bool = False,
             progress: bool = False) -> dict:
    """{"bpb": bits per byte, "bytes": bytes scored, and each level's metrics (``model(x).metrics``:
    "l1/recon_acc", "l1/bytes_per_code", ...), averaged over the windows weighted by their bytes} over
    ``data`` (or its first ``max_bytes``) in consecutive windows of ``seq_len`` bytes."""
    if max_bytes is not None:
        data = data[:max_bytes]
    if len(data) == 0:
        raise ValueError("no bytes to score")
    rows, tail = windows(data, seq_len)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)] + ([tail] if tail else [])
    nll, metrics = torch.zeros((), dtype=torch.float64), {}
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16) if amp else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:  # a Ctrl-C here (training stops validation at once) must not leave the model in eval mode
        for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
            x = torch.stack(batch).to(device).long()
            with autocast:
                nll += model.nll(x).double().sum().cpu()
                out = model(x)
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * x.numel()
    finally:
        model.train(was_training)
    n = len(data)
    return {"bpb": float(nll) / n / math.log(2), "bytes": n, **{k: v / n for k, v in metrics.items()}}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.hierarchical.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of agiformer.hierarchical.train (last.pt, best.pt, base.pt)")
    parser.add_argument("--data", help="stdlib, enwik8 or a file/folder (default: the checkpoint's training data)")
    parser.add_argument("--data-dir", help="where enwik8 / enwik8.zip lie")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--seq-len", type=int, help="window length in bytes (default: the checkpoint's training "
                                                    "length)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, help="score only the split's first N bytes")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _cli.at_least(parser, args, 1, "batch_size", "seq_len", "max_bytes")
    _cli.check_device(parser, args.device)
    _cli.check_backend(parser, args.backend)

    with _cli.user_errors(parser):
        model, ckpt = load_model(args.checkpoint, device=args.device, backend=args.backend)
        train_config = ckpt.get("train_config", {})
        corpus = load_corpus(args.data or train_config.get("data", "stdlib"), args.data_dir)
        data = corpus.split(args.split)
        if len(data) == 0:
            raise UsageError(f"--split {args.split}: the {args.split} split of {corpus.name} is empty")
        seq_len = args.seq_len or train_config.get("seq_len", 256)
    start = time.perf_counter()
    try:
        result = evaluate(model, data, seq_len=seq_len, batch_size=args.batch_size, device=args.device,
                          max_bytes=args.max_bytes, amp=args.amp, progress=not args.quiet and sys.stderr.isatty())
    except KeyboardInterrupt:
        _cli.interrupted(parser)
    elapsed = time.perf_counter() - start
    n = result["bytes"]
    print(f"{corpus.name} {args.split}: {result['bpb']:.4f} bits/byte over {n:,} bytes "
          f"({n / elapsed:,.0f} bytes/s, seq_len {seq_len})")
    for k, v in result.items():
        if k not in ("bpb", "bytes"):
            print(f"{k} {v:.4f}")


if __name__ == "__main__":
    main()
