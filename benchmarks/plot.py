"""Draw time and peak memory against sequence length, one line per implementation (log axes).

    python -m benchmarks.plot benchmarks/results/cpu-sweep.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(Path(results).read_text())
    series: dict = {}  # op -> impl -> [(L, ms, MB)]
    for r in record["rows"]:
        if r.get("status") != "ok" or "L" not in r["params"]:
            continue
        ms = r.get("fwd_bwd_ms") or r.get("fwd_ms")
        series.setdefault(r["op"], {}).setdefault(r["impl"], []).append((r["params"]["L"], ms, r.get("peak_mb")))
    written = []
    for op, impls in sorted(series.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for impl, points in sorted(impls.items()):
            points.sort()
            ls = [p[0] for p in points]
            ax_t.plot(ls, [p[1] for p in points], marker="o", label=impl)
            if all(p[2] is not None and p[2] > 0 for p in points):
                ax_m.plot(ls, [p[2] for p in points], marker="o", label=impl)
        for ax, label in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory beyond inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{op} on {record['device']} (commit {record['commit'][:10]})", fontsize=10)
        fig.tight_layout()
        png = Path(results).with_name(f"{Path(results).stem}-{op}.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written


if __name__ == "__main__":
    for path in plot(Path(sys.argv[1])):
        print(f"wrote {path}")
