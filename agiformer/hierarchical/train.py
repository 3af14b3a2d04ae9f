"""Train the hierarchical byte autoencoder, in two stages.

    python -m agiformer.hierarchical.train --config tiny                 # base stage: runs/hier-tiny/base.pt
    python -m agiformer.hierarchical.train --stage top --base runs/hier-tiny/base.pt   # top LM: runs/hier-tiny-top
    python -m agiformer.hierarchical.train --config tiny --resume auto   # continue runs/hier-tiny/last.pt exactly
    python -m agiformer.hierarchical.train --config my.json --mlflow --project hier   # MLflow in ./mlruns/hier

--config names a config under agiformer/hierarchical/configs/ or a JSON file (the model, its loss weights
included); training settings are flags, whose defaults match AGIFORMER's tiny preset. --stage base trains
the compressors and expanders (their byte LMs too) and, at the end, writes <out>/base.pt; --stage top takes
the model and weights of --base, freezes them, and trains the top code LM alone.

Writes to --out: last.pt (model, optimizer, schedule, RNG, data stream, step, config, stage: everything an
exact resume needs), best.pt (best validation bits per byte), metrics.jsonl / metrics.csv (the stage's
losses, each level's reconstruction accuracy and bytes per code, and at each validation the same on the
validation split with val_ in front), samples/ (reconstructions of validation windows, and in the top stage
a continuation, at each validation) and, with --mlflow, an MLflow run with all of these. Validation
bits per byte are HierarchicalAutoencoder.nll's causal likelihood (see agiformer.hierarchical.evaluate);
the last validation covers the whole split.

Ctrl-C and --resume behave as for python -m agiformer.train: the step in hand is finished and saved, and
--resume auto continues bit for bit. A resumed run refuses another --config, --stage, --base, --data or
--seed; the other flags apply from there on and last.pt lists each change.
"""

from __future__ import annotations

from .. import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import _cli, checkpoint
from ..data import RandomWindows, load_corpus
from ..errors import CheckpointError, UsageError
from ..evaluate import default_device
from ..train import (Interrupts, Run, add_training_flags, optimizer_and_schedule, range_problem,
                     read_training_checkpoint, restore, resumed_config, run_loop, warm_up)
from . import HierarchicalAutoencoder, load_config
from .evaluate import evaluate

STAGES = ("base", "top")
# What a resumed run refuses to change: the model, what it trains, and the data stream.
FIXED_ON_RESUME = ("config", "stage", "base", "data", "seed")
# Training settings: AGIFORMER's tiny preset, so the two train on the same bytes by default.
DEFAULTS = dict(config="tiny", stage="base", base=None, data="stdlib", batch_size=16, seq_len=256, steps=600,
                lr=2e-3, warmup=60, min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0, eval_every=100,
                eval_bytes=100_000, eval_batch_size=32, checkpoint_every=200, log_every=20, seed=0, out=None,
                resume=None, max_minutes=0, device=None, backend=None, amp=None, mlflow=False, project=None,
                data_dir=None)
SAMPLE_ROWS, SAMPLE_BYTES = 2, 256  # validation windows reconstructed, bytes continued, at each validation


def model_from(spec: str, flag: str = "--config") -> dict:
    """The complete model config ``spec`` (a config's name or a JSON file) gives; ``UsageError`` naming the
    flag when it cannot be read or does not build."""
    try:
        config = load_config(spec)
        with torch.device("meta"):
            return HierarchicalAutoencoder(config).config
    except (TypeError, ValueError, KeyError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{flag} {spec}: {e}") from None


def problem(cfg: dict) -> Optional[str]:
    """What makes ``cfg``'s training settings unusable, as a message naming the flag; None when they can run."""
    found = range_problem(cfg)
    if found:
        return found
    if cfg["stage"] == "top" and not cfg["base"] and not cfg["resume"]:
        return "--stage top: needs --base, the base.pt of a --stage base run"
    if cfg["stage"] == "base" and cfg["base"]:
        return f"--base {cfg['base']}: only for --stage top (--stage base trains a base from scratch)"
    if cfg["eval_bytes"] is not None and cfg["eval_bytes"] < 1:
        return f"--eval-bytes {cfg['eval_bytes']}: must be at least 1 (0: the whole split)"
    return None


def train(cfg: dict, *, quiet: bool = False) -> dict:
    """Run a stage as ``cfg`` says (see ``parse_args``); returns the last metrics row. On Ctrl-C, saves what
    the module docstring says and re-raises KeyboardInterrupt."""
    with Interrupts() as interrupts:
        return _train(cfg, quiet, interrupts)


def _train(cfg: dict, quiet: bool, interrupts: Interrupts) -> dict:
    device = torch.device(cfg["device"] or default_device())
    out = Path(cfg["out"])
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    resume = cfg["resume"]
    if resume == "auto":
        resume = str(out / "last.pt") if (out / "last.pt").exists() else None
    ckpt, changes, base = None, {}, None
    if resume:
        ckpt = read_training_checkpoint(resume)
        if "stage" not in ckpt:
            raise CheckpointError(f"{resume}: not a hierarchical autoencoder checkpoint (an AGIFORMER one? "
                                  f"python -m agiformer.train resumes those)")
        saved = ckpt["train_config"]
        given = list(cfg.get("given", cfg))
        if "config" in given and model_from(cfg["config"]) == saved["model"]:
            given.remove("config")  # the same model, however named
        cfg, changes = resumed_config({**cfg, "given": given}, saved, ckpt["step"], resume, FIXED_ON_RESUME)
    elif cfg["stage"] == "top":
        base = checkpoint.read(cfg["base"])
        if base.get("stage") != "base" or not isinstance(base.get("config"), dict):
            raise UsageError(f"--base {cfg['base']}: not the base.pt of a --stage base run")
        if "config" in cfg.get("given", cfg) and model_from(cfg["config"]) != base["config"]:
            raise UsageError(f"--config {cfg['config']}: differs from the model of --base {cfg['base']} (the top "
                             f"stage trains on that base: leave --config out)")
        cfg = {**cfg, "config": base["train_config"]["config"], "model": base["config"]}
    if "model" not in cfg:
        cfg = {**cfg, "model": model_from(cfg["config"])}
    found = problem(cfg)
    if found:
        raise UsageError(found)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_leftovers(out)
    train_config = {k: v for k, v in cfg.items() if k != "given"}
    amp = cfg["amp"] if cfg["amp"] is not None else device.type == "cuda"

    corpus = load_corpus(cfg["data"], cfg["data_dir"])
    if len(corpus.val) == 0:
        raise UsageError(f"--data {cfg['data']}: its validation split is empty")
    torch.manual_seed(cfg["seed"])
    model = HierarchicalAutoencoder(cfg["model"], backend=cfg["backend"]).to(device)
    if base is not None:
        model.load_state_dict(base["model"])
    model.set_stage(cfg["stage"])
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(trained, cfg)
    sampler = RandomWindows(corpus.train, cfg["seq_len"], cfg["batch_size"], cfg["seed"])
    torch.manual_seed(cfg["seed"])
    autocast = torch.autocast(device.type, torch.bfloat16) if amp else contextlib.nullcontext()

    def loss(seq: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with autocast:
            result = model(seq)
        return result.loss, {**{k: float(v.detach()) for k, v in result.losses.items()}, **result.metrics}

    def validate(max_bytes: Optional[int]) -> dict:
        result = evaluate(model, corpus.val, seq_len=cfg["seq_len"], batch_size=cfg["eval_batch_size"],
                          device=device, max_bytes=max_bytes, amp=amp, progress=not quiet and sys.stderr.isatty())
        return {"val_bpb": result["bpb"], **{f"val_{k}": v for k, v in result.items() if k not in ("bpb", "bytes")}}

    def samples() -> dict:
        return sample_texts(model, corpus.val, cfg["seq_len"], cfg["stage"], device)

    run = Run(cfg=cfg, out=out, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
              device=device, interrupts=interrupts, loss=loss, validate=validate,
              contents=dict(config=model.config, train_config=train_config, stage=cfg["stage"]), say=say,
              quiet=quiet, resume=resume, ckpt=ckpt, changes=changes, nll_loss=False, samples=samples,
              columns=("step", "elapsed_s", "lr", "loss"), project=cfg["project"])
    restore(run)
    model.train()
    warm_up(lambda seq: loss(seq)[0], model, cfg["seq_len"], device)
    total = sum(p.numel() for p in model.parameters())
    say(f"hierarchical autoencoder {total:,} parameters ({sum(p.numel() for p in trained):,} trained in stage "
        f"{cfg['stage']}) on {device}; data {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} val "
        f"bytes); {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes")
    row = run_loop(run)
    if cfg["stage"] == "base":
        checkpoint.save(out / "base.pt", model=model.state_dict(), config=model.config, stage="base",
                        train_config=train_config, step=row.get("step", run.step))
        say(f"base for --stage top: {out / 'base.pt'}")
    return row


@torch.no_grad()
def sample_texts(model: HierarchicalAutoencoder, data: torch.Tensor, seq_len: int, stage: str,
                 device: torch.device) -> dict:
    """{file name: text}: the first validation windows beside their reconstructions and, in the top stage, a
    greedy continuation of the first one; the RNG and the model's mode are left as they were."""
    rows = min(SAMPLE_ROWS, max(1, len(data) // seq_len))
    x = data[: rows * seq_len].reshape(rows, -1).to(device).long()
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            rebuilt = model.reconstruct(x).cpu()
            texts = {"reconstruction.txt": "".join(
                f"--- original\n{_text(a)}\n--- reconstruction ({int((a == b).sum())}/{len(a)} bytes equal)\n"
                f"{_text(b)}\n" for a, b in zip(x.cpu(), rebuilt))}
            if stage == "top":
                prompt = bytes(x[0, : max(1, x.shape[1] // 2)].tolist())
                texts["continuation.txt"] = (f"--- prompt\n{_text(prompt)}\n--- continuation\n"
                                             f"{_text(model.generate_bytes(prompt, SAMPLE_BYTES))}\n")
    finally:
        model.train(was_training)
    return texts


def _text(data) -> str:
    return bytes(data.tolist() if isinstance(data, torch.Tensor) else data).decode("utf-8", errors="replace")


def build_parser() -> argparse.ArgumentParser:
    # Every default SUPPRESS: the namespace holds exactly the flags given, which a resumed run applies or refuses.
    parser = argparse.ArgumentParser(prog="python -m agiformer.hierarchical.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    g = parser.add_argument_group("model")
    g.add_argument("--config", help="a config's name under agiformer/hierarchical/configs/ or a JSON file "
                                    "(default tiny; the top stage takes --base's)")
    g.add_argument("--stage", choices=STAGES, help="base: compressors and expanders (default); top: the top LM "
                                                  "on the frozen --base")
    g.add_argument("--base", help="base.pt of a --stage base run (for --stage top)")
    add_training_flags(parser, out_help="output folder (default runs/hier-<config>; for --stage top, --base's folder "
                                        "with -top after it)", seq_len_help="window length in bytes")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[dict, bool]:
    """(config: the defaults, then the flags given, whose names ``cfg["given"]`` lists; quiet). A value that
    cannot work is argparse's usage error, before anything loads."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    quiet = given.pop("quiet", False)
    cfg = {**DEFAULTS, **given}
    cfg["device"] = cfg["device"] or default_device()
    if not cfg["out"]:
        top = cfg["stage"] == "top"
        cfg["out"] = f"{Path(cfg['base']).parent}-top" if top and cfg["base"] else \
            f"runs/hier-{Path(cfg['config']).stem}" + ("-top" if top else "")
    cfg["eval_bytes"] = cfg["eval_bytes"] or None
    cfg["given"] = sorted(given)
    found = problem(cfg)
    if found:
        parser.error(found)
    if "config" in given:
        try:
            model_from(cfg["config"])
        except UsageError as e:
            parser.error(str(e))
    _cli.check_device(parser, cfg["device"])
    _cli.check_backend(parser, cfg["backend"])
    return cfg, quiet


def main(argv: Optional[list[str]] = None) -> None:
    cfg, quiet = parse_args(argv)
    parser = build_parser()
    try:
        with _cli.user_errors(parser):
            train(cfg, quiet=quiet)
    except KeyboardInterrupt:
        _cli.interrupted(parser)


if __name__ == "__main__":
    main()
