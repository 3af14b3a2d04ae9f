"""Bits per byte of a checkpoint over a whole split.

    python -m agiformer.evaluate runs/tiny/last.pt                     # its training data, val split
    python -m agiformer.evaluate best_model.pth --data enwik8 --split test   # an original v1 checkpoint
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import contextlib
import math
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import _cli, checkpoint
from .data import eval_windows, load_corpus
from .errors import UsageError
from .model import AGIFORMER


@torch.no_grad()
def bits_per_byte(model: AGIFORMER, data: torch.Tensor, *, seq_len: int = 1024, batch_size: int = 8,
                  device: torch.device | str = "cpu", max_bytes: Optional[int] = None, amp: bool = False,
                  progress: bool = False) -> tuple[float, int]:
    """(bits per byte, bytes scored) over ``data`` (or its first ``max_bytes``), in consecutive windows
    of ``seq_len`` (see ``eval_windows``). Under torch.distributed each rank scores every world-th batch
    and the sums are all-reduced, so every rank returns the total. Data too short to hold one window
    (2 · patch_size bytes) is a ValueError, not 0 bits over 0 bytes."""
    if max_bytes is not None:
        data = data[:max_bytes]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    windows = list(eval_windows(data, seq_len, model.patch_size))
    if not windows:
        raise ValueError(f"{len(data)} bytes hold no window to score: at least 2 · patch_size = "
                         f"{2 * model.patch_size} bytes are needed")
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    if len(batches) and len(batches[-1][-1]) != len(batches[-1][0]):  # the short last window goes alone
        batches[-1], tail = batches[-1][:-1], batches[-1][-1:]
        batches = [b for b in batches if b] + [tail]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16) if amp else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:  # a Ctrl-C here (training stops validation at once) must not leave the model in eval mode
        for batch in tqdm(batches[rank::world], desc="eval", disable=not progress, leave=False):
            seq = torch.stack(batch).to(device).long()
            with autocast:
                loss = model.sequence_loss(seq, reduction="sum")
            total[0] += loss.double()
            total[1] += seq.shape[0] * (seq.shape[1] - model.patch_size)
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    n = int(total[1])
    return float(total[0]) / max(n, 1) / math.log(2), n


def add_model_overrides(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("for an original v1 state_dict (sizes not visible in its weights; our "
                                  "checkpoints record them, and a different value is an error)")
    g.add_argument("--num-heads", type=int, help="attention heads (v1 default 8)")
    g.add_argument("--window-size", type=int, help="window in patches (v1 default 128)")
    g.add_argument("--thinking-steps", type=int, help="reasoning steps (v1 default 3)")


def model_overrides(args: argparse.Namespace) -> dict:
    return dict(num_heads=args.num_heads, window_size=args.window_size, thinking_steps=args.thinking_steps)


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks every tool that loads a checkpoint makes before loading it: overrides, device, backend."""
    _cli.at_least(parser, args, 1, "num_heads", "window_size")
    _cli.at_least(parser, args, 0, "thinking_steps")
    _cli.check_device(parser, args.device)
    _cli.check_backend(parser, args.backend)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="our checkpoint (.pt) or an original v1 best_model.pth")
    parser.add_argument("--data", help="stdlib, enwik8 or a file/folder (default: the checkpoint's training "
                                       "data; stdlib for a v1 state_dict)")
    parser.add_argument("--data-dir", help="where enwik8 / enwik8.zip lie")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--seq-len", type=int, help="window length in bytes (default: the checkpoint's training "
                                                    "length, 1024 for a v1 state_dict)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, help="score only the split's first N bytes (at least one window: "
                                                      "2 patches)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_overrides(parser)
    args = parser.parse_args(argv)
    _cli.at_least(parser, args, 1, "batch_size", "seq_len", "max_bytes")
    check_common(parser, args)

    with _cli.user_errors(parser):
        model, ckpt = checkpoint.load_model(args.checkpoint, device=args.device, backend=args.backend,
                                            overrides=model_overrides(args))
        source = args.data or ckpt.get("train_config", {}).get("data", "stdlib")
        seq_len = args.seq_len or ckpt.get("train_config", {}).get("seq_len", 1024)
        P = model.patch_size
        if seq_len % P or seq_len < 2 * P:
            raise UsageError(f"--seq-len {seq_len}: must be a multiple of the model's patch_size {P} and at "
                             f"least two patches ({2 * P})")
        corpus = load_corpus(source, args.data_dir)
        data = corpus.split(args.split)
        scored = len(data) if args.max_bytes is None else min(args.max_bytes, len(data))
        if scored < 2 * P:
            what = f"--max-bytes {args.max_bytes}" if scored < len(data) else f"the {args.split} split of {corpus.name}"
            raise UsageError(f"{what}: {scored} bytes hold no window to score (at least two patches, {2 * P} "
                             f"bytes)")
    start = time.perf_counter()
    try:
        bpb, n = bits_per_byte(model, data, seq_len=seq_len, batch_size=args.batch_size, device=args.device,
                               max_bytes=args.max_bytes, amp=args.amp,
                               progress=not args.quiet and sys.stderr.isatty())
    except KeyboardInterrupt:
        _cli.interrupted(parser)
    elapsed = time.perf_counter() - start
    print(f"{corpus.name} {args.split}: {bpb:.4f} bits/byte over {n:,} bytes "
          f"({n / elapsed:,.0f} bytes/s, seq_len {seq_len})")


if __name__ == "__main__":
    main()
