"""Train AGIFORMER.

    python -m agiformer.train --preset tiny                 # minutes on a CPU, embedded data
    python -m agiformer.train --preset v1 --data enwik8     # the original configuration
    torchrun --nproc_per_node 8 -m agiformer.train --preset v1 --batch-size 4    # per-GPU batch
    python -m agiformer.train --preset tiny --resume auto   # continue runs/tiny/last.pt exactly

Every flag overrides the preset. Writes to --out (default runs/<preset>): last.pt (model, optimizer,
scheduler, RNG, data stream, step, config), best.pt (best validation), metrics.jsonl / metrics.csv
(and TensorBoard events when tensorboard is installed, MLflow with --mlflow). Ctrl-C saves last.pt.
Under torchrun each rank draws its own windows (its slice of one seeded global batch, so N ranks
match one process with the combined batch) and seeds its dropout with seed + rank; rank 0 logs and
checkpoints.
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint
from .data import RandomWindows, load_corpus
from .evaluate import bits_per_byte
from .model import AGIFORMER, DEFAULT_CONFIG, num_parameters

MODEL_KEYS = tuple(DEFAULT_CONFIG)
PRESETS = {
    # A few CPU minutes on the embedded corpus (Python sources): about 2.5 bits/byte on the whole
    # validation split after its 600 steps (about 3.5 minutes on 2 busy cores).
    "tiny": dict(d_model=128, n_layers=2, num_heads=4, patch_size=4, window_size=32, vocab_size=256, dropout=0.0,
                 thinking_steps=1, data="stdlib", batch_size=16, seq_len=256, steps=600, lr=2e-3, warmup=60,
                 min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0, eval_every=100, eval_bytes=100_000,
                 eval_batch_size=32, checkpoint_every=200, log_every=20),
    # The original: default model, AdamW 3e-4 constant, clip 0.5, B4 L1024 on enwik8.
    "v1": dict(DEFAULT_CONFIG, data="enwik8", batch_size=4, seq_len=1024, steps=50_000, lr=3e-4, warmup=0,
               min_lr_ratio=1.0, weight_decay=0.01, grad_clip=0.5, eval_every=1000, eval_bytes=1_000_000,
               eval_batch_size=8, checkpoint_every=1000, log_every=50),
}


def lr_factor(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SequenceLoss(nn.Module):
    """DistributedDataParallel syncs gradients only through forward(): route the fused loss through it."""

    def __init__(self, model: AGIFORMER):
        super().__init__()
        self.model = model

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.model.sequence_loss(seq)


class MetricsLog:
    """metrics.jsonl + metrics.csv (+ TensorBoard / MLflow); on resume, rows after the checkpoint's step go."""

    COLUMNS = ("step", "elapsed_s", "lr", "loss", "bpb", "bytes_per_s", "val_bpb")

    def __init__(self, out: Path, resume_step: int, mlflow: bool, config: dict):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        rows = []
        if resume_step and self.jsonl.exists():
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["step"] <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.COLUMNS} for r in rows)
        self.tb = self.mlflow = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
        if mlflow:
            import mlflow as mlflow_module

            self.mlflow = mlflow_module
            self.mlflow.start_run()
            self.mlflow.log_params(config)

    def write(self, row: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow({k: row.get(k, "") for k in self.COLUMNS})
        metrics = {k: v for k, v in row.items() if k not in ("step", "elapsed_s") and v is not None}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; initialises the process group (NCCL for
    CUDA devices, gloo for the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda" and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"--device cuda: process {local_rank} of this node needs GPU {local_rank}, the node has "
                         f"{torch.cuda.device_count()} (one process per GPU; --device cpu runs them on the CPU)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), world, local_rank


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when it is true on one: ranks must agree before leaving the loop together."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def train(cfg: dict, *, quiet: bool = False) -> dict:
    """Run training as ``cfg`` says (a preset merged with flags); returns the last metrics row."""
    device = torch.device(cfg["device"])
    rank, world, local_rank = _distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    amp = cfg["amp"] if cfg["amp"] is not None else device.type == "cuda"
    out = Path(cfg["out"])
    lead = rank == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet or not lead else (lambda *a: print(*a, file=sys.stderr, flush=True))

    model_config = {k: cfg[k] for k in MODEL_KEYS}
    torch.manual_seed(cfg["seed"])
    model = AGIFORMER(**model_config, backend=cfg["backend"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg["warmup"], cfg["steps"], cfg["min_lr_ratio"])
    )
    corpus = load_corpus(cfg["data"], cfg["data_dir"])
    sampler = RandomWindows(corpus.train, cfg["seq_len"], cfg["batch_size"], cfg["seed"], rank, world)
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs per rank

    step, elapsed, best = 0, 0.0, float("inf")
    resume = cfg["resume"]
    if resume == "auto":
        resume = str(out / "last.pt") if (out / "last.pt").exists() else None
    if resume:
        ckpt = checkpoint.read(resume)  # on the CPU: RNG states must stay there; the loads below move the rest
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["sampler"])
        rngs = ckpt["rng"]
        if len(rngs) == world:
            _set_rng_state(rngs[rank], device)
        else:
            say(f"checkpoint holds RNG for {len(rngs)} ranks, this run has {world}: dropout reseeded")
            torch.manual_seed(cfg["seed"] + rank + ckpt["step"])
        step, elapsed, best = ckpt["step"], ckpt["elapsed_s"], ckpt.get("best_val_bpb", float("inf"))
        say(f"resumed {resume} at step {step}")

    wrapped: nn.Module = SequenceLoss(model)
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    log = MetricsLog(out, step, cfg["mlflow"], cfg) if lead else None
    say(f"AGIFORMER {num_parameters(model):,} parameters on {device} x{world}; data {corpus.name} "
        f"({len(corpus.train):,} train / {len(corpus.val):,} val bytes); {cfg['steps']} steps of "
        f"{cfg['batch_size'] * world} x {cfg['seq_len']} bytes")

    def save(path: Path, gather: bool = True) -> None:
        rngs = [_rng_state(device)]
        if world > 1 and gather:
            rngs = [None] * world
            dist.all_gather_object(rngs, _rng_state(device))
            rngs = [{k: v.cpu() for k, v in r.items()} for r in rngs]
        if lead:
            checkpoint.save(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), sampler=sampler.state_dict(), rng=rngs, step=step,
                            elapsed_s=elapsed, best_val_bpb=best, config=model_config, train_config=cfg)

    def validate(max_bytes: Optional[int]) -> float:
        bpb, _ = bits_per_byte(model, corpus.val, seq_len=cfg["seq_len"], batch_size=cfg["eval_batch_size"],
                               device=device, max_bytes=max_bytes, amp=amp,
                               progress=lead and not quiet and sys.stderr.isatty())
        return bpb

    autocast = torch.autocast(device.type, torch.bfloat16) if amp else contextlib.nullcontext()
    bytes_per_step = cfg["batch_size"] * world * cfg["seq_len"]
    bar = tqdm(total=cfg["steps"], initial=step, disable=quiet or not lead or not sys.stderr.isatty(),
               dynamic_ncols=True)
    row: dict = {}
    model.train()
    try:
        while step < cfg["steps"]:
            start = time.perf_counter()
            seq = sampler.next().to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)  # before forward: last step's gradients free meanwhile
            with autocast:
                loss = wrapped(seq)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            scheduler.step()
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            step += 1
            elapsed += time.perf_counter() - start
            row = dict(step=step, elapsed_s=round(elapsed, 3), lr=optimizer.param_groups[0]["lr"],
                       loss=float(loss), bpb=float(loss) / math.log(2),
                       bytes_per_s=bytes_per_step / (time.perf_counter() - start))
            final = step == cfg["steps"]
            if step % cfg["eval_every"] == 0 or final:
                row["val_bpb"] = validate(None if final else cfg["eval_bytes"])
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", bpb=f"{row['bpb']:.3f}", B_s=f"{row['bytes_per_s']:,.0f}",
                            **({"val": f"{row['val_bpb']:.3f}"} if "val_bpb" in row else {}))
            if lead and (step % cfg["log_every"] == 0 or "val_bpb" in row):
                log.write(row)
                if bar.disable:
                    say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if "val_bpb" in row and row["val_bpb"] < best:
                best = row["val_bpb"]
                save(out / "best.pt")
            if step % cfg["checkpoint_every"] == 0 or final:
                save(out / "last.pt")
            if cfg["max_minutes"] and not final and _any_rank(elapsed > 60 * cfg["max_minutes"], device, world):
                say(f"time limit of {cfg['max_minutes']} min reached at step {step}")
                save(out / "last.pt")
                break
    except KeyboardInterrupt:
        save(out / "last.pt", gather=False)
        say(f"\ninterrupted: saved {out / 'last.pt'} at step {step} (continue with --resume auto)")
    finally:
        bar.close()
        if log is not None:
            log.close()
    if "val_bpb" in row:
        say(f"step {step}: validation {row['val_bpb']:.4f} bits/byte (whole split); checkpoint {out / 'last.pt'}")
    return row


def parse_args(argv: Optional[list[str]] = None) -> tuple[dict, bool]:
    parser = argparse.ArgumentParser(prog="python -m agiformer.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="defaults for every flag below")
    g = parser.add_argument_group("model")
    for key in ("d_model", "n_layers", "num_heads", "patch_size", "window_size", "thinking_steps"):
        g.add_argument("--" + key.replace("_", "-"), type=int)
    g.add_argument("--dropout", type=float)
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="stdlib (embedded, offline), enwik8, or a text file / folder")
    g.add_argument("--data-dir", help="where enwik8 / enwik8.zip lie (else $AGIFORMER_DATA or .)")
    g.add_argument("--batch-size", type=int, help="windows per step per process")
    g.add_argument("--seq-len", type=int, help="window length in bytes")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--warmup", type=int, help="linear warmup steps")
    g.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (1: constant)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="output folder (default runs/<preset>)")
    g.add_argument("--resume", help="checkpoint to continue, or 'auto' for <out>/last.pt if present")
    g.add_argument("--eval-every", type=int, help="validate every N steps (the last one on the whole split)")
    g.add_argument("--eval-bytes", type=int, help="periodic validation on the split's first N bytes (0: all)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this much training time")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--backend", help="op backend (default: fastest available)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    g.add_argument("--mlflow", action="store_true", help="also log to MLflow (must be installed)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None or key not in cfg:
            cfg[key] = value
    cfg["out"] = cfg["out"] or f"runs/{args.preset}"
    cfg["eval_bytes"] = cfg["eval_bytes"] or None
    quiet = cfg.pop("quiet")
    return cfg, quiet


def main(argv: Optional[list[str]] = None) -> None:
    cfg, quiet = parse_args(argv)
    try:
        train(cfg, quiet=quiet)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
