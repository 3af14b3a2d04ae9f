"""Time and measure every implementation of every benchmark case; print a table, write JSON.

    python -m benchmarks.run --quick                 # CPU-sized shapes (SPEC §3 "CPU" line)
    python -m benchmarks.run --device cuda           # the GPU shapes, beside the alternatives
    python -m benchmarks.run --sweep --plot          # time and memory against L, drawn to PNG
    python -m benchmarks.run --op linear_attention --impl cpu --impl reference

Times are medians: ``triton.testing.do_bench`` on GPU, ``torch.utils.benchmark`` on CPU. Backward is
fwd+bwd minus fwd. Peak memory is what a fwd+bwd allocates beyond its inputs: the CUDA allocator's peak
on GPU, the RSS high-water mark on CPU (reset through /proc/self/clear_refs). Each implementation's
output is checked against the reference's before its time is reported (column ``err``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from statistics import median

import torch

from benchmarks import registry
from benchmarks.registry import CASES, IMPLS, Case, Impl

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- measuring


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def grad_inputs(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def make_steps(case: Case, impl: Impl, inputs: dict):
    """Closures running the forward, and forward+backward, of impl on inputs."""
    leaves = grad_inputs(inputs)
    backward = case.backward and bool(leaves)

    def fwd():
        if backward:
            return impl.run(inputs)
        with torch.inference_mode():
            return impl.run(inputs)

    grad_out = {}

    def fwd_bwd():
        out = first_tensor(impl.run(inputs))
        if out.dtype.is_floating_point and out.requires_grad:
            if "g" not in grad_out:
                grad_out["g"] = torch.randn_like(out)
            out.backward(grad_out["g"])
        for t in leaves:
            t.grad = None

    return fwd, (fwd_bwd if backward else None)


def time_ms(fn, device: str, min_run_time: float) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_run_time * 1000))))
    from torch.utils import benchmark

    fn()  # warm up: first-use builds, allocator
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median * 1e3


def _rss_kib(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def peak_mb(fn, device: str) -> float | None:
    """Memory fn allocates at its peak beyond what is live before it, in MiB."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None
    try:  # hand freed heap pages back, so the baseline RSS is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def rel_err(out, ref) -> float | None:
    out, ref = first_tensor(out), first_tensor(ref)
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)) or out.shape != ref.shape:
        return None
    if not out.dtype.is_floating_point:
        return float((out != ref).double().mean())  # fraction of differing ids (sampling at temperature 0)
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def roofline_fraction(case: Case, fwd_ms: float, peaks: dict) -> float | None:
    """Share of the roofline reached by the forward: (max of compute time and memory time) / measured time."""
    if not (case.flops or case.bytes) or not fwd_ms:
        return None
    ideal_s = max(case.flops / peaks["flops"][str(case.dtype)], case.bytes / peaks["bytes_per_s"])
    return ideal_s / (fwd_ms / 1e3)


def measure_peaks(device: str, dtypes: set) -> dict:
    """This device's own matmul throughput per dtype and copy bandwidth: the roofline's ceilings."""
    n = 4096 if device == "cuda" else 1024
    flops = {}
    for dtype in dtypes:
        dt = dtype if (device == "cuda" or dtype in (torch.float32, torch.float64)) else torch.float32
        a = torch.randn(n, n, device=device, dtype=dt)
        ms = time_ms(lambda: a @ a, device, 0.3)
        flops[str(dtype)] = 2 * n**3 / (ms / 1e3)
    x = torch.empty(64 * 2**20 // 4, device=device)  # 64 MiB: past every cache
    ms = time_ms(lambda: x.clone(), device, 0.3)
    return {"flops": flops, "bytes_per_s": 2 * x.numel() * 4 / (ms / 1e3)}


# ---------------------------------------------------------------- running


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        model = found.group(1) if found else model
    return f"{model} ({torch.get_num_threads()} threads)"


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "agiformer_kernels", "csrc", "agiformer"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def select_cases(args) -> list[Case]:
    chosen = []
    for c in CASES:
        if c.device != args.device or (args.op and c.op not in args.op):
            continue
        if args.quick and not c.quick or args.sweep and not c.sweep:
            continue
        if not (args.quick or args.sweep) and c.sweep:
            continue
        if args.case and not any(p in c.name for p in args.case):
            continue
        chosen.append(c)
    return chosen


def run_case(case: Case, args, peaks: dict) -> list[dict]:
    rows, ref_out = [], None
    impls = [i for i in IMPLS.get(case.op, []) if not args.impl or i.name in args.impl]
    # the reference runs first: its output checks every other implementation
    impls.sort(key=lambda i: i.name != "reference")
    for impl in impls:
        row = {"op": case.op, "case": case.name, "params": case.params, "dtype": str(case.dtype).split(".")[-1],
               "impl": impl.name, "alternative": impl.alternative}
        reason = impl.available(case)
        if reason:
            rows.append({**row, "status": f"skipped: {reason}"})
            continue
        try:
            torch.manual_seed(0)
            inputs = case.make_inputs(case.device, case.dtype)
            fwd, fwd_bwd = make_steps(case, impl, inputs)
            with torch.inference_mode():
                out = impl.run(inputs)
            if impl.name == "reference":
                ref_out = out
            err = rel_err(out, ref_out) if ref_out is not None and impl.name != "reference" else None
            del out
            mem = peak_mb(fwd_bwd or fwd, case.device) if not args.no_memory else None
            fwd_ms = time_ms(fwd, case.device, args.min_run_time)
            total_ms = time_ms(fwd_bwd, case.device, args.min_run_time) if fwd_bwd else None
            rows.append({**row, "status": "ok", "fwd_ms": fwd_ms, "fwd_bwd_ms": total_ms,
                         "bwd_ms": total_ms - fwd_ms if total_ms else None, "peak_mb": mem, "err": err,
                         "flops": case.flops, "bytes": case.bytes,
                         "roofline": roofline_fraction(case, fwd_ms, peaks)})
        except Exception as e:  # one failing implementation must not sink the run: record it
            rows.append({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        finally:
            inputs = fwd = fwd_bwd = None
            gc.collect()
        print(format_row(rows[-1]), flush=True)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Per case, each implementation's fwd+bwd (or fwd) speed relative to the best alternative that ran."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), []).append(r)
    for group in by_case.values():
        def t(r):
            return r.get("fwd_bwd_ms") or r.get("fwd_ms")

        base = [r for r in group if r.get("status") == "ok" and r["alternative"] and t(r)]
        if not base:
            base = [r for r in group if r.get("status") == "ok" and r["impl"] == "reference"]
        if not base:
            continue
        best = min(base, key=t)
        for r in group:
            if r.get("status") == "ok" and t(r):
                r["baseline"] = best["impl"]
                r["speedup"] = t(best) / t(r)


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


HEADER = (f"{'op':<26}{'case':<26}{'impl':<18}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'peak MB':>10}"
          f"{'roofline':>9}{'err':>10}  {'speedup':<18}")


def format_row(r: dict) -> str:
    name = r["impl"] + (" (alt)" if r["alternative"] else "")
    if r.get("status") != "ok":
        return f"{r['op']:<26}{r['case']:<26}{name:<18}{r['status']}"
    speed = f"{r['speedup']:.2f}x vs {r['baseline']}" if "speedup" in r else ""
    roof = f"{100 * r['roofline']:.0f}%" if r.get("roofline") else "-"
    return (f"{r['op']:<26}{r['case']:<26}{name:<18}{fmt(r['fwd_ms'], '10.3f')}{fmt(r['bwd_ms'], '10.3f')}"
            f"{fmt(r['fwd_bwd_ms'], '10.3f')}{fmt(r['peak_mb'], '10.1f')}{roof:>9}{fmt(r['err'], '10.1e')}  {speed}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the CPU-sized cases")
    parser.add_argument("--sweep", action="store_true", help="only the sweep-over-L cases (for --plot)")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--impl", action="append", help="only this implementation (repeatable)")
    parser.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<device>-<kind>.json)")
    parser.add_argument("--plot", action="store_true", help="also draw time and memory against L (PNG)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and implementations")
    args = parser.parse_args(argv)

    registry.load_all()
    cases = select_cases(args)
    if args.list:
        for c in cases:
            print(c.op, c.name, c.device, c.dtype, [i.name for i in IMPLS.get(c.op, [])])
        return 0
    if not cases:
        print("no benchmark case matches", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 1

    peaks = measure_peaks(args.device, {c.dtype for c in cases})
    print(f"device: {device_name(args.device)}; measured peaks: "
          + ", ".join(f"{k.split('.')[-1]} {v / 1e9:.0f} GFLOP/s" for k, v in peaks["flops"].items())
          + f", copy {peaks['bytes_per_s'] / 1e9:.0f} GB/s")
    print(HEADER)
    rows = []
    for case in cases:
        rows += run_case(case, args, peaks)
    add_speedups(rows)
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))

    kind = "sweep" if args.sweep else "quick" if args.quick else "full"
    out = args.out or RESULTS / f"{args.device}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device_name(args.device),
        "device_type": args.device,
        "versions": versions(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:])),
        "peaks": peaks,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    if args.plot:
        from benchmarks.plot import plot

        for png in plot(out):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
