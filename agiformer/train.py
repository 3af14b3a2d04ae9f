"""Train AGIFORMER.

    python -m agiformer.train --preset tiny                 # minutes on a CPU, embedded data
    python -m agiformer.train --preset v1 --data enwik8     # the original configuration
    torchrun --nproc_per_node 8 -m agiformer.train --preset v1 --batch-size 4    # per-GPU batch
    python -m agiformer.train --preset tiny --resume auto   # continue runs/tiny/last.pt exactly
    python -m agiformer.train --architecture tiny-mixed     # a heterogeneous stack (or --architecture my.json)

Every flag overrides the preset; --architecture (a flavor of agiformer.components.flavors or a JSON file)
overrides the preset's model, and the size flags override it. Writes to --out (default runs/<preset>):
last.pt (model, optimizer, scheduler, RNG, data stream, step, config: the architecture too, which evaluate,
generate and inspect rebuild), best.pt (best validation), metrics.jsonl / metrics.csv
(and TensorBoard events when tensorboard is installed, MLflow with --mlflow). elapsed_s counts training
steps only: start-up (a first use's kernel builds), validation and saving are left out.

Ctrl-C: during a step (or a log write, or a save) the step is finished, last.pt saved and the run stops
(exit status 130); during validation it stops at once and last.pt says so, and the resumed run validates
that step again; during start-up it stops at once with nothing to save. A second Ctrl-C stops at once,
saving what is consistent. Whichever it was, --resume auto continues bit for bit as if never stopped:
same batches, dropout, optimizer, schedule, metrics rows and final validation.

--resume takes the checkpoint's configuration; flags given with it apply from there on (optimisation,
batch, evaluation, logging: last.pt lists each change with its step under "changes") or, for what would
make it another run (model sizes, --architecture, --data, --seed, --preset), are refused.

Under torchrun each rank draws its own windows (its slice of one seeded global batch, so N ranks
match one process with the combined batch) and seeds its dropout with seed + rank; rank 0 logs and
checkpoints.

The loop itself (``Run``, ``restore``, ``run_loop``: steps, validation, checkpoints, metrics, Ctrl-C) is
shared: ``python -m agiformer.hierarchical.train`` drives it with its own model, losses and validation.
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import _cli, checkpoint
from .data import RandomWindows, load_corpus
from .errors import CheckpointError, UsageError
from .evaluate import bits_per_byte, default_device
from .components import MODEL_KEYS, flavors, validate
from .model import AGIFORMER, num_parameters

# What a resumed run refuses to change: the weights' shapes and meaning, and the data stream.
FIXED_ON_RESUME = ("d_model", "n_layers", "num_heads", "patch_size", "window_size", "vocab_size", "thinking_steps",
                   "architecture", "embedding", "final_norm", "top", "head", "data", "seed", "preset")
# Keys of the configuration that describe one invocation's command line, not the run: never saved.
ARGV_KEYS = ("given", "architecture_flag")
# One invocation's settings: taken from the command line on every run, never compared with a checkpoint's.
RUN_KEYS = ("out", "resume", "device", "backend", "amp", "mlflow", "project", "max_minutes", "data_dir")
# The flags presets do not set.
FLAG_DEFAULTS = dict(seed=0, out=None, resume=None, max_minutes=0, device=None, backend=None, amp=None, mlflow=False,
                     project=None, data_dir=None)
SCHEDULE_KEYS = ("lr", "warmup", "steps", "min_lr_ratio")
PRESETS = {
    # A few CPU minutes on the embedded corpus (Python sources): about 2.5 bits/byte on the whole
    # validation split after its 600 steps (about 3.5 minutes on 2 busy cores).
    "tiny": dict(flavors.flavor("tiny"), data="stdlib", batch_size=16, seq_len=256, steps=600, lr=2e-3, warmup=60,
                 min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0, eval_every=100, eval_bytes=100_000,
                 eval_batch_size=32, checkpoint_every=200, log_every=20),
    # The original: default model, AdamW 3e-4 constant, clip 0.5, B4 L1024 on enwik8.
    "v1": dict(flavors.flavor("v1"), data="enwik8", batch_size=4, seq_len=1024, steps=50_000, lr=3e-4, warmup=0,
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
    """metrics.jsonl + metrics.csv (+ TensorBoard / MLflow); on resume, rows after the checkpoint's step go.

    The CSV has ``columns`` first, then every other key the rows bring, in the order they first appear
    (the file is rewritten when a row brings a new one). MLflow, with ``mlflow``: a run in the tracking
    store MLflow is configured with, or with ``project`` the file store ./mlruns/<project>; metrics go in
    batches of ``mlflow_batch`` rows (``log_batch``), and ``text`` logs a text artifact."""

    COLUMNS = ("step", "elapsed_s", "lr", "loss", "bpb", "bytes_per_s", "val_bpb")

    def __init__(self, out: Path, resume_step: int, mlflow: bool, config: dict, columns: tuple = COLUMNS,
                 project: Optional[str] = None, mlflow_batch: int = 20):
        self.out, self.jsonl, self.csv = out, out / "metrics.jsonl", out / "metrics.csv"
        self.rows = []
        if resume_step and self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed run
                    continue
            self.rows = [r for r in self.rows if r["step"] <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.columns = list(columns)
        self._rewrite_csv()
        self.tb = self.mlflow = None
        self._pending, self._batch = [], mlflow_batch
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
        if mlflow:
            import mlflow as mlflow_module

            self.mlflow = mlflow_module
            if project:
                # MLflow 3 keeps its file store behind this opt-in; --project asks for that store by name
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                self.mlflow.set_tracking_uri((Path("mlruns") / project).resolve().as_uri())
            self.run_id = self.mlflow.start_run().info.run_id
            # a parameter's value is capped (500 characters in older MLflow): a long model config is cut
            self.mlflow.log_params({k: v if len(str(v)) <= 500 else str(v)[:497] + "..." for k, v in config.items()})

    def _rewrite_csv(self) -> None:
        for r in self.rows:
            self.columns += [k for k in r if k not in self.columns]
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.columns} for r in self.rows)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if any(k not in self.columns for k in row):
            self._rewrite_csv()
        else:
            with self.csv.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow({k: row.get(k, "") for k in self.columns})
        metrics = {k: v for k, v in row.items() if k not in ("step", "elapsed_s") and v is not None}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending += [Metric(k, float(v), now, row["step"]) for k, v in metrics.items()]
            if len({m.step for m in self._pending}) >= self._batch:
                self._flush()

    def text(self, name: str, text: str) -> None:
        """A text artifact (sample reconstructions, say): under <out>/samples/ and, with MLflow, the run's."""
        path = self.out / "samples" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if self.mlflow is not None:
            self.mlflow.log_text(text, f"samples/{name}")

    def _flush(self) -> None:
        if self._pending:
            self.mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=self._pending)
            self._pending = []

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self._flush()
            self.mlflow.end_run()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
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


# The training settings every trainer shares, by the least value each may take (lr must be positive).
TRAINING_AT_LEAST_1 = ("batch_size", "seq_len", "steps", "eval_every", "eval_batch_size", "checkpoint_every",
                       "log_every")
TRAINING_AT_LEAST_0 = ("warmup", "weight_decay", "grad_clip", "max_minutes")


def range_problem(cfg: dict, at_least_1: tuple = (), at_least_0: tuple = ()) -> Optional[str]:
    """What puts a training setting of ``cfg`` out of its range (those above, and the keys given here), as
    a message naming the flag; None when every one is in range."""
    def flag(key: str) -> str:
        return f"--{key.replace('_', '-')} {cfg[key]}"

    for key in (*at_least_1, *TRAINING_AT_LEAST_1):
        if cfg[key] < 1:
            return f"{flag(key)}: must be at least 1"
    for key in (*at_least_0, *TRAINING_AT_LEAST_0):
        if cfg[key] < 0:
            return f"{flag(key)}: must be at least 0"
    if not cfg["lr"] > 0:
        return f"{flag('lr')}: must be positive"
    if not 0 <= cfg["min_lr_ratio"] <= 1:
        return f"{flag('min_lr_ratio')}: must lie in [0, 1]"
    return None


def config_problem(cfg: dict, combined: bool = True) -> Optional[str]:
    """What makes ``cfg`` unusable, as a message naming the flag; None when it can run. ``combined=False``
    checks each value alone, not how they fit together (sizes a checkpoint will supply)."""
    def flag(key: str) -> str:
        return f"--{key.replace('_', '-')} {cfg[key]}"

    problem = range_problem(cfg, ("d_model", "n_layers", "num_heads", "patch_size", "window_size"),
                            ("thinking_steps",))
    if problem:
        return problem
    if not 0 <= cfg["dropout"] < 1:
        return f"{flag('dropout')}: must lie in [0, 1)"
    if not combined:
        return None
    if cfg["d_model"] % 2 or cfg["d_model"] % cfg["num_heads"]:
        return f"{flag('d_model')}: must be even (rotary positions) and a multiple of --num-heads {cfg['num_heads']}"
    P, L = cfg["patch_size"], cfg["seq_len"]
    if L % P or L < 2 * P:
        return (f"{flag('seq_len')}: must be a multiple of --patch-size {P} and at least two patches ({2 * P}): a "
                f"window's first patch is context only")
    if cfg["eval_bytes"] is not None and cfg["eval_bytes"] < 2 * P:
        return f"{flag('eval_bytes')}: validation needs at least one window of two patches ({2 * P} bytes); 0: all"
    return None


def model_config(cfg: dict) -> dict:
    """The model config in a run's configuration (keys a checkpoint from before architectures lacks: v1's)."""
    return {k: cfg[k] for k in MODEL_KEYS if cfg.get(k) is not None}


def model_problem(cfg: dict) -> Optional[str]:
    """What keeps the model config in ``cfg`` from building (an unknown component, a bad option), as a message
    naming --architecture when that supplied it; None when it builds. Builds on the meta device: no memory."""
    try:
        with torch.device("meta"):
            AGIFORMER.from_config(model_config(cfg))
    except (TypeError, ValueError) as e:
        spec = cfg.get("architecture_flag")
        return f"--architecture {spec[0]}: {e}" if spec else str(e)
    return None


def read_architecture(spec: str) -> dict:
    """The model keys ``--architecture spec`` gives: a flavor's name or a JSON file holding a model config (a
    dict with ``architecture`` or sizes), one layer dict for every layer, or a list of layer dicts (whose
    length is then ``n_layers``). ``UsageError`` naming the flag when it cannot be read."""
    if spec in flavors.names():
        content = flavors.flavor(spec)
    else:
        try:
            content = json.loads(Path(spec).read_text())
        except OSError as e:
            raise UsageError(f"--architecture {spec}: neither a flavor ({', '.join(flavors.names())}) nor a "
                             f"readable file ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--architecture {spec}: not JSON ({e})") from None
    if isinstance(content, list):
        return {"architecture": content, "n_layers": len(content)}
    if isinstance(content, dict) and any(k in MODEL_KEYS for k in content):
        other = [k for k in content if k not in MODEL_KEYS]
        if other:
            raise UsageError(f"--architecture {spec}: {other[0]!r} is not a model config key (those: "
                             f"{', '.join(MODEL_KEYS)}); training settings are flags")
        return content
    return {"architecture": content}


def _validated(cfg: dict) -> Optional[dict]:
    try:
        return validate(model_config(cfg))
    except (TypeError, ValueError):
        return None


def _flag(cfg: dict, key: str) -> str:
    """How the command line gave ``key``: its own flag, or --architecture when that file supplied it."""
    spec = cfg.get("architecture_flag")
    if spec and key in spec[1]:
        return f"--architecture {spec[0]}"
    return f"--{key.replace('_', '-')} {cfg[key]}"


def resumed_config(cfg: dict, saved: dict, step: int, path: str,
                   fixed: tuple = FIXED_ON_RESUME) -> tuple[dict, dict]:
    """(the configuration a run resumed from a checkpoint at ``step`` goes on with, {key: [old, new]} of what
    changed). It is the checkpoint's, with this invocation's RUN_KEYS and the flags it names (``cfg["given"]``;
    without that list, every key of ``cfg``): a flag in ``fixed`` that differs is a UsageError."""
    given = cfg.get("given")
    if given is None:
        given = list(cfg)
    merged = {**saved, **{k: cfg[k] for k in RUN_KEYS if k in cfg}}
    models = [_validated({**saved, **{k: cfg[k] for k in given if k in MODEL_KEYS and k in cfg}}), _validated(saved)]
    changes = {}
    for key in given:
        if key in RUN_KEYS or key in ARGV_KEYS or key not in cfg:
            continue
        if key in MODEL_KEYS and models[0] is not None and models[1] is not None:
            if models[0][key] == models[1][key]:  # the same model, however written (omitted keys are v1's)
                continue
        elif cfg[key] == saved.get(key):
            continue
        name = _flag(cfg, key)
        if key in fixed and (key in saved or key in MODEL_KEYS):
            old = saved.get(key, models[1][key] if models[1] is not None and key in MODEL_KEYS else None)
            was = f"another {key} ({json.dumps(old)})" if isinstance(old, (dict, list)) else f"{key} = {old}"
            raise UsageError(f"{name}: {path} was trained with {was}, and a resumed run keeps it "
                             f"(a new run needs another --out, or no --resume)")
        changes[key] = [saved.get(key), cfg[key]]
        merged[key] = cfg[key]
    if merged["steps"] < step:
        raise UsageError(f"--steps {merged['steps']}: {path} is at step {step} already")
    return merged, changes


class Interrupts:
    """SIGINT while training. ``at_once`` (start-up, validation on one process): raise KeyboardInterrupt
    there, as Python does, since nothing is lost. Otherwise only set ``requested``: the loop finishes
    the step in hand and stops at the next boundary, where the state is whole. A second SIGINT raises."""

    def __init__(self) -> None:
        self.requested = False
        self.at_once = True
        self._installed = False
        self._previous = None

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: the previous handler was not Python's, and the default is the nearest
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)

    def _handle(self, signum, frame) -> None:
        if self.at_once or self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def immediate(self, on: bool = True) -> Iterator[None]:
        before, self.at_once = self.at_once, on or self.at_once
        try:
            yield
        finally:
            self.at_once = before


def warm_up(loss: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, seq_len: int,
            device: torch.device) -> None:
    """One forward and backward of one window before the first step, its RNG draws and buffer updates undone:
    a first use's kernel builds and compiles happen here, in start-up (where Ctrl-C stops at once and
    elapsed_s does not count), instead of inside step 1."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        loss(torch.zeros(1, seq_len, dtype=torch.long, device=device)).backward()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.zero_grad(set_to_none=True)


@dataclass
class Run:
    """One process's training run as ``restore`` and ``run_loop`` drive it: what a model's trainer builds
    (model, optimizer, schedule, data stream) and the hooks that make the loop that model's."""

    cfg: dict  # steps, grad_clip, the eval / log / checkpoint cadence, max_minutes, the schedule, seed, mlflow
    out: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: RandomWindows
    device: torch.device
    interrupts: Interrupts
    # a batch -> (the loss to backpropagate, floats for its metrics row); set once the model is wrapped
    loss: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, dict]]]
    validate: Callable[[Optional[int]], dict]  # the split's first N bytes (None: all) -> {"val_bpb": ..., ...}
    contents: dict  # what every checkpoint holds beside the training state: config, train_config, ...
    say: Callable[..., None] = lambda *a: None
    quiet: bool = False
    resume: Optional[str] = None  # the checkpoint's path, for messages
    ckpt: Optional[dict] = None  # the checkpoint resumed from
    changes: dict = field(default_factory=dict)  # {key: [old, new]}: flags a resumed run changes
    rank: int = 0
    world: int = 1
    nll_loss: bool = True  # the loss is a mean NLL in nats per byte: its rows carry bpb
    samples: Optional[Callable[[], dict]] = None  # {file name: text} logged as artifacts at each validation
    columns: tuple = MetricsLog.COLUMNS
    project: Optional[str] = None  # MLflow file store ./mlruns/<project> (None: MLflow's configured store)
    # what ``restore`` reads from the checkpoint
    step: int = 0
    elapsed: float = 0.0
    best: float = float("inf")
    pending: Optional[dict] = None
    history: list = field(default_factory=list)


def restore(run: Run) -> None:
    """Load ``run.ckpt`` (when resuming) into the run's model, optimizer, schedule, data stream and RNG, then
    apply the flags it changes (``run.changes``: optimisation settings and the schedule from here on)."""
    ckpt, cfg = run.ckpt, run.cfg
    if ckpt is None:
        return
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.sampler.load_state_dict(ckpt["sampler"])
    run.step = ckpt["step"]
    rngs = ckpt["rng"]
    if len(rngs) == run.world:
        set_rng_state(rngs[run.rank], run.device)
    else:
        run.say(f"checkpoint holds RNG for {len(rngs)} ranks, this run has {run.world}: dropout reseeded")
        torch.manual_seed(cfg["seed"] + run.rank + run.step)
    run.elapsed, run.best = ckpt["elapsed_s"], ckpt.get("best_val_bpb", float("inf"))
    run.pending, run.history = ckpt.get("pending"), list(ckpt.get("changes", []))
    changes = run.changes
    if changes:
        optimizer, scheduler = run.optimizer, run.scheduler
        for group in optimizer.param_groups:  # load_state_dict brought back the old values
            group["weight_decay"] = cfg["weight_decay"]
            group["initial_lr"] = cfg["lr"]
        scheduler.base_lrs = [cfg["lr"]] * len(optimizer.param_groups)
        if any(k in changes for k in SCHEDULE_KEYS):  # the next step's rate, as the new schedule has it
            factor = lr_factor(scheduler.last_epoch, cfg["warmup"], cfg["steps"], cfg["min_lr_ratio"])
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * factor
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        run.history.append({"step": run.step, **{k: {"from": a, "to": b} for k, (a, b) in changes.items()}})
    run.say(f"resumed {run.resume} at step {run.step}"
            + "".join(f"; {k} {a} -> {b}" for k, (a, b) in changes.items()))


def run_loop(run: Run) -> dict:
    """Train ``run`` from its step to ``cfg["steps"]``: steps, metrics rows, validation, best.pt and last.pt,
    the time limit, and Ctrl-C as the module docstring says. Returns the last metrics row."""
    cfg, out, model, optimizer, scheduler, sampler = run.cfg, run.out, run.model, run.optimizer, run.scheduler, \
        run.sampler
    device, interrupts, world, say, quiet = run.device, run.interrupts, run.world, run.say, run.quiet
    lead, resume = run.rank == 0, run.resume
    step, elapsed, best, pending, history = run.step, run.elapsed, run.best, run.pending, run.history
    saved_step = step if run.ckpt is not None and not pending else None  # the step last.pt holds, finished

    def save(path: Path, gather: bool = True, unfinished: Optional[dict] = None,
             best_val: Optional[float] = None) -> None:
        rngs = [rng_state(device)]
        if world > 1 and gather:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
            rngs = [{k: v.cpu() for k, v in r.items()} for r in rngs]
        if lead:
            checkpoint.save(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), sampler=sampler.state_dict(), rng=rngs, step=step,
                            elapsed_s=elapsed, best_val_bpb=best if best_val is None else best_val,
                            pending=unfinished, changes=history, **run.contents)

    def finish(row: dict) -> bool:
        """Validation, metrics row, best.pt and last.pt of the step just taken; True when the time limit
        stops the run."""
        nonlocal best, saved_step
        final, samples = step == cfg["steps"], {}
        if step % cfg["eval_every"] == 0 or final:
            if interrupts.requested:  # stop now, not after a validation the resumed run repeats anyway
                raise KeyboardInterrupt
            with interrupts.immediate(world == 1):  # ranks must leave validation's all_reduce together
                row.update(run.validate(None if final else cfg["eval_bytes"]))
                samples = run.samples() if lead and run.samples is not None else {}
        if bar is not None:
            shown = {"bpb": f"{row['bpb']:.3f}"} if "bpb" in row else {}
            bar.set_postfix(loss=f"{row['loss']:.3f}", **shown, B_s=f"{row['bytes_per_s']:,.0f}",
                            **({"val": f"{row['val_bpb']:.3f}"} if "val_bpb" in row else {}))
        if lead and (step % cfg["log_every"] == 0 or "val_bpb" in row):
            log.write(row)
            if "val_bpb" in row:
                for name, text in samples.items():
                    log.text(f"step{step:07d}-{name}", text)
            if bar is None or bar.disable:
                say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if "val_bpb" in row and row["val_bpb"] < best:
            best = row["val_bpb"]
            save(out / "best.pt")
        if step % cfg["checkpoint_every"] == 0 or final:
            save(out / "last.pt")
            saved_step = step
        if cfg["max_minutes"] and not final and _any_rank(elapsed > 60 * cfg["max_minutes"], device, world):
            say(f"time limit of {cfg['max_minutes']} min reached at step {step}")
            save(out / "last.pt")
            saved_step = step
            return True
        return False

    bytes_per_step = cfg["batch_size"] * world * cfg["seq_len"]
    bar = log = None
    row: dict = dict(pending) if pending else {}
    # Where a KeyboardInterrupt leaves the state: start (nothing changed), boundary (whole, every rank),
    # between / train (whole once train's draws are undone), update (torn), finish (whole but for row).
    phase, best_before, stream_before = "start", best, None
    try:
        log = MetricsLog(out, step - 1 if pending else step, cfg["mlflow"], run.contents["train_config"],
                         run.columns, run.project) if lead else None
        bar = tqdm(total=cfg["steps"], initial=step, disable=quiet or not lead or not sys.stderr.isatty(),
                   dynamic_ncols=True)
        interrupts.at_once = False
        halted = False
        if pending:  # last.pt was saved while this step was being finished
            phase = "finish"
            halted = finish(row)
        elif step == cfg["steps"]:
            say(f"{resume} is at step {step} of {cfg['steps']} already: nothing to do (--steps trains on)")
        while not halted and step < cfg["steps"]:
            phase = "between"
            if _any_rank(interrupts.requested, device, world):
                phase = "boundary"
                raise KeyboardInterrupt
            phase, stream_before = "train", (sampler.state_dict(), rng_state(device))
            start = time.perf_counter()
            seq = sampler.next().to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)  # before forward: last step's gradients free meanwhile
            loss, metrics = run.loss(seq)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            phase = "update"
            optimizer.step()
            scheduler.step()
            step += 1
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            elapsed += time.perf_counter() - start
            row = dict(step=step, elapsed_s=round(elapsed, 3), lr=optimizer.param_groups[0]["lr"],
                       loss=float(loss), **({"bpb": float(loss) / math.log(2)} if run.nll_loss else {}),
                       **metrics, bytes_per_s=bytes_per_step / (time.perf_counter() - start))
            phase, best_before = "finish", best
            bar.update(1)
            halted = finish(row)
    except KeyboardInterrupt:
        last = out / "last.pt"
        if phase == "train":  # nothing updated yet: back to where the step began
            sampler.load_state_dict(stream_before[0])
            set_rng_state(stream_before[1], device)
            phase = "between"
        try:
            if phase == "start":
                say("\ninterrupted during start-up: nothing to save" + (f" ({resume} as it was)" if resume else ""))
            elif phase == "update":
                say(f"\ninterrupted in the middle of step {step + 1}'s update: {last} left as it was")
            elif world > 1 and phase != "boundary":  # this rank alone: the others are elsewhere
                say(f"\ninterrupted on rank {run.rank} alone: {last} left as it was")
            elif phase == "finish":
                save(last, unfinished={k: v for k, v in row.items() if not k.startswith("val_")},
                     best_val=best_before)
                say(f"\ninterrupted while finishing step {step}: saved {last}; --resume auto finishes that step "
                    f"(validation, metrics row) and continues")
            elif saved_step == step or (step == 0 and run.ckpt is None):
                say(f"\ninterrupted at step {step}: " + (f"{last} holds it" if step else "nothing to save yet"))
            else:
                save(last)
                say(f"\ninterrupted: saved {last} at step {step} (continue with --resume auto)")
        except KeyboardInterrupt:  # again, while saving: the save is atomic, the old file stays
            say(f"\ninterrupted again while saving: {last} left as it was")
        raise
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if "val_bpb" in row:
        say(f"step {step}: validation {row['val_bpb']:.4f} bits/byte (whole split); checkpoint {out / 'last.pt'}")
    return row


def train(cfg: dict, *, quiet: bool = False) -> dict:
    """Run training as ``cfg`` says (see ``parse_args``); returns the last metrics row. On Ctrl-C, saves what
    the module docstring says and re-raises KeyboardInterrupt."""
    with Interrupts() as interrupts:
        return _train(cfg, quiet, interrupts)


def _train(cfg: dict, quiet: bool, interrupts: Interrupts) -> dict:
    device = torch.device(cfg["device"] or default_device())
    rank, world, local_rank = _distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    out = Path(cfg["out"])
    lead = rank == 0
    say = (lambda *a: None) if quiet or not lead else (lambda *a: print(*a, file=sys.stderr, flush=True))

    resume = cfg["resume"]
    if resume == "auto":
        resume = str(out / "last.pt") if (out / "last.pt").exists() else None
    ckpt, changes = None, {}
    if resume:
        ckpt = read_training_checkpoint(resume)
        cfg, changes = resumed_config(cfg, ckpt["train_config"], ckpt["step"], resume)
    problem = config_problem(cfg) or model_problem(cfg)
    if problem:  # parse_args checked each flag; here is how they fit the checkpoint's, or a dict from code
        raise UsageError(problem)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_leftovers(out)  # the .tmp of a save that was killed
    train_config = {k: v for k, v in cfg.items() if k not in ARGV_KEYS}
    amp = cfg["amp"] if cfg["amp"] is not None else device.type == "cuda"

    corpus = load_corpus(cfg["data"], cfg["data_dir"])
    P = cfg["patch_size"]
    if len(corpus.val) < 2 * P:
        raise UsageError(f"--data {cfg['data']}: its validation split holds {len(corpus.val)} bytes, fewer than "
                         f"one window of two patches ({2 * P} bytes)")
    torch.manual_seed(cfg["seed"])
    model = AGIFORMER.from_config(model_config(cfg), backend=cfg["backend"]).to(device)
    optimizer, scheduler = optimizer_and_schedule(model.parameters(), cfg)
    sampler = RandomWindows(corpus.train, cfg["seq_len"], cfg["batch_size"], cfg["seed"], rank, world)
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs per rank

    def validate(max_bytes: Optional[int]) -> dict:
        bpb, _ = bits_per_byte(model, corpus.val, seq_len=cfg["seq_len"], batch_size=cfg["eval_batch_size"],
                               device=device, max_bytes=max_bytes, amp=amp,
                               progress=lead and not quiet and sys.stderr.isatty())
        return {"val_bpb": bpb}

    run = Run(cfg=cfg, out=out, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler, device=device,
              interrupts=interrupts, loss=None, validate=validate,
              contents=dict(config=model.config, train_config=train_config), say=say, quiet=quiet, resume=resume,
              ckpt=ckpt, changes=changes, rank=rank, world=world, project=cfg["project"])
    restore(run)
    autocast = torch.autocast(device.type, torch.bfloat16) if amp else contextlib.nullcontext()

    def plain_loss(seq: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model.sequence_loss(seq)

    model.train()
    warm_up(plain_loss, model, cfg["seq_len"], device)  # before DDP, whose hooks would all-reduce its gradients
    wrapped: nn.Module = SequenceLoss(model)
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped,
                                                      device_ids=[device.index] if device.type == "cuda" else None)

    def loss(seq: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with autocast:
            return wrapped(seq), {}

    run.loss = loss
    say(f"AGIFORMER {num_parameters(model):,} parameters on {device} x{world}; data {corpus.name} "
        f"({len(corpus.train):,} train / {len(corpus.val):,} val bytes); {cfg['steps']} steps of "
        f"{cfg['batch_size'] * world} x {cfg['seq_len']} bytes")
    return run_loop(run)


def read_training_checkpoint(path: str) -> dict:
    """A checkpoint ``--resume`` can continue (on the CPU: RNG states must stay there; loads move the rest);
    ``CheckpointError`` for a model-only file."""
    ckpt = checkpoint.read(path)
    missing = {"model", "optimizer", "scheduler", "sampler", "rng", "step", "train_config"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(sorted(missing))}); "
                              f"evaluate and generate read model-only files")
    return ckpt


def optimizer_and_schedule(params, cfg: dict) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW at ``cfg["lr"]`` and ``cfg["weight_decay"]``, on ``lr_factor``'s warmup-cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg["warmup"], cfg["steps"], cfg["min_lr_ratio"])
    )
    return optimizer, scheduler


def add_training_flags(parser: argparse.ArgumentParser, *, out_help: str, seq_len_help: str) -> None:
    """The data, optimisation and run flags every trainer takes (this one and agiformer.hierarchical.train)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="stdlib (embedded, offline), enwik8, or a text file / folder")
    g.add_argument("--data-dir", help="where enwik8 / enwik8.zip lie (else $AGIFORMER_DATA or .)")
    g.add_argument("--batch-size", type=int, help="windows per step (per process under torchrun)")
    g.add_argument("--seq-len", type=int, help=seq_len_help)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--warmup", type=int, help="linear warmup steps")
    g.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (1: constant)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, help="default 0")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help=out_help)
    g.add_argument("--resume", help="checkpoint to continue, or 'auto' for <out>/last.pt if present")
    g.add_argument("--eval-every", type=int, help="validate every N steps (the last one on the whole split)")
    g.add_argument("--eval-bytes", type=int, help="periodic validation on the split's first N bytes (0: all)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--max-minutes", type=float, help="stop (and save) after this much training time")
    g.add_argument("--device", help="default cuda where available, else cpu")
    g.add_argument("--backend", help="op backend (default: fastest available)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    g.add_argument("--mlflow", action="store_true", help="also log to MLflow (must be installed)")
    g.add_argument("--project", help="with --mlflow: the file store ./mlruns/<project> (default: MLflow's configured "
                                     "store)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def build_parser() -> argparse.ArgumentParser:
    # Every default SUPPRESS: the namespace holds exactly the flags given, which a resumed run applies or refuses.
    parser = argparse.ArgumentParser(prog="python -m agiformer.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="defaults for every flag below (default tiny)")
    g = parser.add_argument_group("model")
    g.add_argument("--architecture", metavar="FLAVOR|FILE.json",
                   help=f"the model: a flavor ({', '.join(flavors.names())}) or a JSON file holding a model config, "
                        f"one layer dict for every layer or a list of layer dicts (see agiformer.components)")
    for key in ("d_model", "n_layers", "num_heads", "patch_size", "window_size", "thinking_steps"):
        g.add_argument("--" + key.replace("_", "-"), type=int)
    g.add_argument("--dropout", type=float)
    add_training_flags(parser, out_help="output folder (default runs/<preset>, or runs/<flavor or file name> with "
                                        "--architecture)",
                       seq_len_help="window length in bytes (a multiple of --patch-size, at least two patches)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[dict, bool]:
    """(config: the preset, then the flags given, whose names ``cfg["given"]`` lists; quiet). A value that
    cannot work is argparse's usage error, before anything loads."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    quiet = given.pop("quiet", False)
    preset = given.get("preset", "tiny")
    from_file, spec = {}, given.pop("architecture", None)
    if spec is not None:
        try:
            from_file = read_architecture(spec)
        except UsageError as e:
            parser.error(str(e))
    cfg = {**PRESETS[preset], **FLAG_DEFAULTS, "preset": preset, **from_file, **given}
    if spec is not None:  # what the file gave counts as given: a resumed run compares it with the checkpoint's
        cfg["architecture_flag"] = (spec, sorted(k for k in from_file if k not in given))
        given = {**from_file, **given}
    cfg["device"] = cfg["device"] or default_device()
    cfg["out"] = cfg["out"] or f"runs/{Path(spec).stem if spec is not None else preset}"
    cfg["eval_bytes"] = cfg["eval_bytes"] or None
    cfg["given"] = sorted(given)
    problem = config_problem(cfg, combined=not cfg["resume"])  # resumed: the checkpoint's sizes count
    if problem:
        parser.error(problem)
    if not cfg["resume"]:  # resumed: the checkpoint's model, which the run checks against its own
        problem = model_problem(cfg)
        if problem:
            parser.error(problem)
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
