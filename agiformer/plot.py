"""Draw a run's learning curve (bits per byte against step) from its metrics.jsonl.

    python -m agiformer.plot runs/tiny -o curve.png

Needs matplotlib: pip install "agiformer-kernels[plot]" (or pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from . import _cli


def read_rows(run: Path) -> list[dict]:
    """The rows of ``run``/metrics.jsonl; a line cut short by a killed run is skipped."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot(run: Path, out: Path, title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run)
    val = [r for r in rows if r.get("val_bpb") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["bpb"] for r in rows], label="train (batch)", alpha=0.6)
    ax.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", label="validation (last point: whole split)")
    if val:
        last = val[-1]
        ax.annotate(f"{last['val_bpb']:.2f}", (last["step"], last["val_bpb"]), textcoords="offset points",
                    xytext=(-10, 8))
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    minutes = rows[-1]["elapsed_s"] / 60 if rows else 0
    ax.set_title(title or f"{run.name}: {rows[-1]['step'] if rows else 0} steps, {minutes:.1f} min of training")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run's output folder (holding metrics.jsonl)")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: <run>/curve.png)")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    if not (args.run / "metrics.jsonl").is_file():
        parser.error(f"{args.run}: no metrics.jsonl in it (the --out folder of a training run)")
    if not read_rows(args.run):
        parser.error(f"{args.run}/metrics.jsonl: no rows yet")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(1, f"{parser.prog}: needs matplotlib: {_cli.PLOT_EXTRA}\n")
    out = args.out or args.run / "curve.png"
    plot(args.run, out, args.title)
    print(out)


if __name__ == "__main__":
    main()
