"""Time the Triton GRU recurrence kernels at other block sizes and warp counts: a GPU tool.

    python -m benchmarks.tune_gru                                  # docs/ops.md §3 GRU shapes, bf16
    python -m benchmarks.tune_gru --m 8192 --kernel bwd --config 32,64,64,8,3

The kernels are gru_patch_decode's forward ("fwd") and backward ("bwd", timed as fwd+bwd with the forward at its
default) and greedy gru_patch_sample with the byte table ("sample"). A config is (BLOCK_M, BLOCK_N, BLOCK_K,
num_warps, num_stages), set in ``GPU_CONFIGS`` of agiformer_kernels/ops/gru_patch/triton.py for one kernel at a
time. Each config's output is checked against the default config's (relative RMS of the hidden states and of
every gradient; the share of equal bytes for sampling), then timed (``triton.testing.do_bench``). The table goes
to stdout and the rows to a JSON (``--out``). The faster configs that pass belong in ``GPU_CONFIGS``.

On CPU the kernels run through the Triton interpreter, with its own blocks: the script runs end to end at a toy
size (its test), and its times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from agiformer_kernels import gru_patch_decode, gru_patch_sample
from agiformer_kernels.ops.gru_patch import triton as gru_triton
from benchmarks.cases import gru_patch as gru_cases
from benchmarks.run import commit, describe, device_name, rel_err, time_ms, versions

# the default first; then those that spill least in ptxas's report (Triton 3.6, sm_90, bf16), larger row blocks,
# and deeper or shallower pipelines (the K loops are 4 to 12 trips)
CANDIDATES = [(32, 64, 64, 4, 3), (32, 64, 64, 8, 3), (32, 64, 32, 8, 3), (32, 32, 32, 4, 3), (32, 32, 64, 4, 3),
              (16, 64, 64, 4, 3), (64, 32, 64, 4, 3), (64, 64, 64, 8, 3), (32, 64, 32, 8, 4), (32, 64, 64, 8, 2)]
KERNELS = ("fwd", "bwd", "sample")
WEIGHTS = ("byte_emb", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def make_inputs(M: int, P: int, h: int, device: str, dtype: torch.dtype) -> dict:
    """The GRU benchmark cases' inputs (weights and context with gradients, the byte table), the targets as the
    teacher-forced bytes, and an upstream gradient."""
    x = gru_cases.make_inputs(M, P, h, grad=True, table=True)(device, dtype)
    x["grad"] = torch.randn(M, P, h, device=device, dtype=dtype)
    return x


def step(kernel: str, x: dict, P: int):
    """A closure running the kernel's op, and one returning the outputs its check compares."""
    leaves = [x[k] for k in ("context", *WEIGHTS)]

    def decode():
        return gru_patch_decode(x["context"], x["targets"], *(x[k] for k in WEIGHTS), backend="triton")

    def fwd_bwd():
        decode().backward(x["grad"])
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        return grads

    def sample():
        with torch.no_grad():
            return gru_patch_sample(x["context"], *(x[k] for k in WEIGHTS), x["head_weight"], x["head_bias"],
                                    patch_size=P, byte_table=x["byte_table"], backend="triton")

    if kernel == "fwd":
        return decode, lambda: [decode().detach()]
    if kernel == "bwd":
        return fwd_bwd, fwd_bwd
    return sample, lambda: [sample()]


def tolerance(dtype: torch.dtype) -> float:
    """The disagreement a config may show with the default's: both round to the dtype (docs/ops.md §3's bound on each
    against the oracle), and sampled bytes may flip where two logits are within rounding of each other."""
    return {torch.bfloat16: 1e-2, torch.float16: 1e-2}.get(dtype, 1e-5)


def disagreement(out: list, ref: list) -> float:
    """Worst relative RMS over the outputs (float), or the share of differing bytes (sampling): the runner's err."""
    return max(rel_err(o, r) for o, r in zip(out, ref))


def tune(kernel: str, M: int, P: int, h: int, configs: list, device: str, dtype: torch.dtype,
         min_run_time: float) -> list[dict]:
    x = make_inputs(M, P, h, device, dtype)
    run, outputs = step(kernel, x, P)
    default = gru_triton.GPU_CONFIGS[kernel]
    ref = outputs()
    rows = []
    for config in configs:
        row = {"kernel": kernel, "M": M, "P": P, "h": h, "config": list(config),
               "default": tuple(config) == default}
        try:
            with gru_triton.gpu_config(kernel, tuple(config)):
                row["disagreement"] = disagreement(outputs(), ref)
                row["ok"] = row["disagreement"] <= tolerance(dtype)
                row["ms"] = time_ms(run, device, min_run_time)
        except Exception as e:  # a config the GPU cannot take (resources): recorded, the others go on
            row["error"] = describe(e)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    config = "BLOCK_M %d BLOCK_N %d BLOCK_K %d warps %d stages %d" % tuple(r["config"])
    mark = " (default)" if r["default"] else ""
    if "error" in r:
        return f"{r['kernel']:7s} M{r['M']:<6d} {config}{mark}: {r['error']}"
    check = "ok" if r["ok"] else "DIFFERS"
    return f"{r['kernel']:7s} M{r['M']:<6d} {config}  {r['ms']:8.3f} ms  {check} ({r['disagreement']:.1e}){mark}"


def parse_config(text: str) -> tuple:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"a config is BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only this kernel (repeatable)")
    parser.add_argument("--m", type=int, action="append", help="patches (repeatable; default 8192 and 65536)")
    parser.add_argument("--p", type=int, default=4)
    parser.add_argument("--h", type=int, default=256)
    parser.add_argument("--config", type=parse_config, action="append",
                        help="BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per config (CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gru-tune.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 1
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("on CPU the Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    record = {"device": device_name(args.device), "versions": versions(), "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dtype": str(dtype).split(".")[-1], "rows": []}
    for kernel in args.kernel or KERNELS:
        for M in args.m or [8192, 65536]:
            record["rows"] += tune(kernel, M, args.p, args.h, args.config or CANDIDATES, args.device, dtype,
                                   args.min_run_time)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1) + "\n")  # rewritten as it goes: a cut run keeps rows
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
