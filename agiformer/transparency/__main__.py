"""Draw a prompt's information-flow graph and print, per patch, the heads and neurons that matter most.

    python -m agiformer.transparency runs/tiny/last.pt --prompt "def main():\\n    return 0\\n" -o graph.png

Per patch: its bytes, the model's most likely next byte, the heads with the largest share of the stream
after their attention (any layer) and the FFN neurons with the largest share of their FFN's output
(Ferrando & Voita 2024; docs/transparency.md). The picture needs matplotlib: pip install
"agiformer-kernels[graph]".
"""

from __future__ import annotations

from .. import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import os
import sys
from typing import Optional

import torch

from .. import _cli, checkpoint
from ..evaluate import add_model_overrides, check_common, default_device, model_overrides
from .graph import GRAPH_EXTRA, contributions, draw, neuron_contributions
from .model import AgiformerTransparentLlm, render

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _quoted(text: str) -> str:
    return f"'{text}'"


def _best(items: list[tuple[float, str]], top: int) -> str:
    return "  ".join(f"{name} {share:.2f}" for share, name in sorted(items, reverse=True)[:top])


def report(llm: AgiformerTransparentLlm, top: int) -> tuple[str, object]:
    """The per-patch table for row 0 of ``llm``'s last run, and the contributions it was read from."""
    c = contributions(llm, 0)
    n, n_layers = len(c.tokens), len(c.attn)
    probs = llm.logits()[0, :n].float().softmax(-1)
    lines = [f"{n} patches; shares of the stream after attention (heads) and of the FFN output (neurons)", ""]
    for i in range(n):
        p, byte = probs[i].max(-1)
        heads = [(float(c.attn[l][i, :, h].sum()), f"L{l}.{label}") for l in range(n_layers)
                 for h, label in enumerate(c.heads[l])]
        neurons = []
        for l in range(n_layers):
            shares = neuron_contributions(llm, 0, l, i)
            values, index = shares.topk(min(top, shares.numel()))
            neurons += [(float(v), f"L{l}.n{int(k)}") for v, k in zip(values, index)]
        lines.append(f"{i:4d}  {_quoted(c.tokens[i]):12}  next {_quoted(render(bytes([int(byte)]))):6} {float(p):.2f}  "
                     f"heads: {_best(heads, top)}   neurons: {_best(neurons, top)}")
    return "\n".join(lines), c


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.transparency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="our checkpoint (.pt) or an original v1 best_model.pth")
    _cli.add_prompt(parser, "The quick brown fox jumps over the lazy dog. ")
    parser.add_argument("-o", "--out", help="draw the graph to this PNG (needs the graph extra)")
    parser.add_argument("--threshold", type=float, default=0.04,
                        help="the smallest share an edge of the drawn paths has (default 0.04)")
    parser.add_argument("--top", type=int, default=3, help="heads and neurons printed per patch (default 3)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    add_model_overrides(parser)
    args = parser.parse_args(argv)
    check_common(parser, args)
    _cli.at_least(parser, args, 1, "top")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold {args.threshold}: a share, between 0 and 1")
    prompt = _cli.read_prompt(parser, args)
    with _cli.user_errors(parser):
        model, _ = checkpoint.load_model(args.checkpoint, device=args.device, backend=args.backend,
                                         overrides=model_overrides(args))
    if len(prompt) < model.patch_size:
        parser.error(f"the prompt holds {len(prompt)} bytes, less than one patch ({model.patch_size} bytes)")
    llm = AgiformerTransparentLlm(model.to(DTYPES[args.dtype]))
    llm.run([prompt])
    text, c = report(llm, args.top)
    print(text)
    if args.out is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(1, f"{parser.prog}: drawing the graph needs matplotlib: {GRAPH_EXTRA}\n")
    try:
        draw(c, args.out, threshold=args.threshold, title=f"information flow: {os.path.basename(args.checkpoint)}")
    except OSError as e:
        parser.exit(1, f"{parser.prog}: error: -o {args.out}: {e.strerror or e}\n")
    print(args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
