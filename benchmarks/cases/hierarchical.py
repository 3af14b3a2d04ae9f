"""The hierarchical byte autoencoder (agiformer/hierarchical/configs/tiny.json) against fixed-4-byte AGIFORMER
(the ``tiny`` preset), at about the same parameters.

Runner cases (``python -m benchmarks.run --op hierarchical``): one training step's forward + backward at the
tiny preset's B16 L256, and greedy generation of 32 bytes after a 256-byte prompt at batch 1; peak memory is
the runner's.

The comparison (``python -m benchmarks.cases.hierarchical``) trains both on the embedded corpus on the same
training bytes (2000 steps of the tiny preset's 16 x 256 bytes) and reports, per model: validation bits per
byte over the whole split (AGIFORMER's sequence loss; HierarchicalAutoencoder.nll's causal likelihood, which
the base stage trains and the top LM does not enter; ``--top-share``, default a quarter, is the share of the
hierarchical model's steps its top stage gets, which changes only its generations), training
bytes per second (training steps only), greedy generation bytes per second (256 bytes after a 256-byte
validation prompt), peak RSS beyond the start of its training, and for the hierarchical model each level's
reconstruction accuracy and bytes per code on the validation split. Each model trains in a process of its
own, so peak memory and allocator state are its own.

    python -m benchmarks.cases.hierarchical                    # the full comparison (a few CPU minutes each)
    python -m benchmarks.cases.hierarchical --steps 20         # a quick check of the pipeline
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.registry import case, impl

OP = "hierarchical"
CONFIG = "tiny"  # agiformer/hierarchical/configs/tiny.json, sized to the tiny preset's parameters
PROMPT_BYTES, NEW_BYTES = 256, 256  # the comparison's generation
CASE_NEW_BYTES = 32  # the runner's generation case (the hierarchical model reruns its levels for every byte)


def _models(device: str, train: bool) -> dict:
    from agiformer import AGIFORMER
    from agiformer.hierarchical import HierarchicalAutoencoder, load_config
    from agiformer.train import PRESETS, model_config

    torch.manual_seed(0)
    agiformer = AGIFORMER.from_config(model_config(PRESETS["tiny"])).to(device).train(train)
    hierarchical = HierarchicalAutoencoder(load_config(CONFIG)).to(device).train(train)
    hierarchical.set_stage("base")
    return {"agiformer": agiformer, "hierarchical": hierarchical}


def train_inputs(B: int, L: int):
    def make(device, dtype):
        built = _models(device, train=True)
        inputs = {"seq": torch.randint(0, 256, (B, L), device=device), **built}
        for name, model in built.items():  # the parameters are the leaves the runner differentiates
            inputs.update({f"{name}.{n}": p for n, p in model.named_parameters() if p.requires_grad})
        return inputs

    return make


def generation_inputs(context: int, new_bytes: int):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        prompt = bytes(torch.randint(32, 127, (context,), generator=g).tolist())
        return {"prompt": prompt, "new_bytes": new_bytes, **_models(device, train=False)}

    return make


def run_hierarchical(inputs):
    m = inputs["hierarchical"]
    if "prompt" in inputs:
        return torch.tensor(list(m.generate_bytes(inputs["prompt"], inputs["new_bytes"])))
    return m(inputs["seq"]).loss


def run_agiformer(inputs):
    from agiformer.generation import generate

    m = inputs["agiformer"]
    if "prompt" in inputs:
        return torch.tensor(list(generate(m, [inputs["prompt"]], inputs["new_bytes"])[0]))
    return m.sequence_loss(inputs["seq"])


impl(OP, "hierarchical", run_hierarchical)
impl(OP, "agiformer", run_agiformer, alternative=True)
case(OP, "train-B16-L256", "cpu", torch.float32, train_inputs(16, 256), params=dict(B=16, L=256))
case(OP, f"generate-B1-ctx{PROMPT_BYTES}-new{CASE_NEW_BYTES}", "cpu", torch.float32,
     generation_inputs(PROMPT_BYTES, CASE_NEW_BYTES), backward=False, items=CASE_NEW_BYTES, unit="bytes",
     params=dict(B=1, context=PROMPT_BYTES, new_bytes=CASE_NEW_BYTES))


# ---------------------------------------------------------------- the comparison


def _generation_rate(generate_fn, prompt: bytes) -> float:
    generate_fn(prompt[:16], 8)  # warm up: first-use builds, allocator
    start = time.perf_counter()
    new = generate_fn(prompt, NEW_BYTES)
    return len(new) / (time.perf_counter() - start)


def train_agiformer(steps: int, out: Path, device: str) -> dict:
    from agiformer import checkpoint, train
    from agiformer.data import load_corpus
    from agiformer.generation import generate
    from agiformer.model import num_parameters
    from benchmarks.run import peak_mb

    cfg, _ = train.parse_args(["--preset", "tiny", "--steps", str(steps), "--out", str(out), "--device", device,
                               "--eval-every", str(steps), "--checkpoint-every", str(steps)])
    rows = []
    peak = peak_mb(lambda: rows.append(train.train(cfg, quiet=True)), device)
    row = rows[0]
    model, _ = checkpoint.load_model(out / "last.pt", device=device)
    prompt = bytes(load_corpus("stdlib").val[:PROMPT_BYTES].tolist())
    rate = _generation_rate(lambda p, n: generate(model, [p], n)[0], prompt)
    bytes_trained = steps * cfg["batch_size"] * cfg["seq_len"]
    return {"model": "agiformer", "config": "tiny preset (fixed 4-byte patches)", "parameters": num_parameters(model),
            "steps": steps, "bytes_trained": bytes_trained, "val_bpb": row["val_bpb"],
            "train_bytes_per_s": bytes_trained / row["elapsed_s"], "generate_bytes_per_s": rate, "peak_mb": peak}


def train_hierarchical(steps: int, top_share: float, out: Path, device: str) -> dict:
    from agiformer.data import load_corpus
    from agiformer.hierarchical import train
    from agiformer.hierarchical.evaluate import load_model
    from benchmarks.run import peak_mb

    top_steps = round(steps * top_share)
    stages = [("base", steps - top_steps, out / "base", [])]
    if top_steps:
        stages.append(("top", top_steps, out / "top", ["--base", str(out / "base" / "base.pt")]))
    rows, elapsed = [], 0.0

    def run_all():
        nonlocal elapsed
        for stage, n, folder, extra in stages:
            cfg, _ = train.parse_args(["--config", CONFIG, "--stage", stage, "--steps", str(n), "--out", str(folder),
                                       "--device", device, "--eval-every", str(n), "--checkpoint-every", str(n),
                                       *extra])
            rows.append(train.train(cfg, quiet=True))
            elapsed += rows[-1]["elapsed_s"]

    peak = peak_mb(run_all, device)
    final = rows[-1]
    model, _ = load_model(str(stages[-1][2] / "last.pt"), device=device)
    prompt = bytes(load_corpus("stdlib").val[:PROMPT_BYTES].tolist())
    rate = _generation_rate(model.generate_bytes, prompt)
    bytes_trained = steps * train.DEFAULTS["batch_size"] * train.DEFAULTS["seq_len"]
    levels = {k.removeprefix("val_"): v for k, v in rows[0].items()
              if k.startswith("val_") and k.split("/")[-1] in ("recon_acc", "bytes_per_code")}
    return {"model": "hierarchical", "config": f"configs/{CONFIG}.json", "parameters": sum(
        p.numel() for p in model.parameters()), "steps": steps, "base_steps": steps - top_steps,
        "top_steps": top_steps, "bytes_trained": bytes_trained, "val_bpb": final["val_bpb"],
        "train_bytes_per_s": bytes_trained / elapsed,
        "generate_bytes_per_s": rate, "peak_mb": peak, **levels}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cases.hierarchical", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="training steps of 16 x 256 bytes, each model")
    parser.add_argument("--top-share", type=float, default=0.25,
                        help="the hierarchical model's share of steps in its top stage (default %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<device>-hierarchical.json)")
    parser.add_argument("--child", choices=["agiformer", "hierarchical"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if not 0 <= args.top_share < 1:
        parser.error(f"--top-share {args.top_share}: must lie in [0, 1) (the base stage needs steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one model in this process: print its row as JSON
        with tempfile.TemporaryDirectory() as tmp:
            row = (train_agiformer(args.steps, Path(tmp), args.device) if args.child == "agiformer"
                   else train_hierarchical(args.steps, args.top_share, Path(tmp), args.device))
        print(json.dumps(row))
        return 0

    from benchmarks.run import RESULTS, commit, device_name, isa, versions

    out = args.out or RESULTS / f"{args.device}-hierarchical.json"
    record = {"device": device_name(args.device), "device_type": args.device, **isa(), "versions": versions(),
              "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.cases.hierarchical"]
                                  + (argv if argv is not None else sys.argv[1:])),
              "threads": torch.get_num_threads(), "data": "stdlib", "rows": []}
    flags = ["--steps", str(args.steps), "--top-share", str(args.top_share), "--device", args.device]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    for child in ("agiformer", "hierarchical"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.cases.hierarchical", "--child", child, *flags],
                              capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            row = {"model": child, "status": f"failed (exit status {done.returncode})"}
        else:
            row = {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
    record["load_average_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
