"""Look inside a checkpoint on a prompt: the reasoning loop and the hybrid layers.

    python -m agiformer.inspect runs/tiny/last.pt --prompt "def main():\\n    return 0\\n"
    python -m agiformer.inspect best_model.pth --prompt-file page.txt --json

Reports, averaged over the prompt's patches:
- reasoning (v1's diagnostics): per thinking step, Δz = ‖x_{t+1} − x_t‖ (absolute and relative to
  ‖x_t‖) and statistics of the gate σ(gate(n)): mean, std, min, max, share of units open (> 0.5);
- per hybrid layer: the residual stream norm ‖x‖ after the layer and the update ratio
  ‖x_out − x_in‖ / ‖x_in‖; the norms of the window-attention branch a and the linear-attention branch
  s, and the window share ‖a‖ / (‖a‖ + ‖s‖) of what the two add to the residual (before out_proj).
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import json
import sys
from typing import Optional

import torch

from . import _cli, checkpoint
from .evaluate import add_model_overrides, check_common, default_device, model_overrides
from .model import AGIFORMER


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.float().norm(dim=-1)  # per patch


@torch.no_grad()
def diagnostics(model: AGIFORMER, prompt: bytes) -> dict:
    """The report described in the module docstring for one prompt (at least one whole patch)."""
    P = model.patch_size
    n = len(prompt) // P * P
    if n == 0:
        raise ValueError(f"the prompt must hold at least one whole patch ({P} bytes), got {len(prompt)}")
    device = next(model.parameters()).device
    x = torch.tensor([list(prompt[:n])], dtype=torch.long, device=device)
    layers: list[dict] = [{} for _ in model.layers]
    steps: list[dict] = []
    hooks = []

    def layer_hook(i):
        def hook(module, inputs, output):
            before, after = inputs[0], output
            layers[i]["residual_norm"] = float(_norm(after).mean())
            layers[i]["update_ratio"] = float((_norm(after - before) / _norm(before).clamp_min(1e-12)).mean())
        return hook

    def branch_hook(i, name):
        def hook(module, inputs, output):
            layers[i][name] = _norm(output)
        return hook

    for i, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_hook(layer_hook(i)))
        hooks.append(layer.attn.register_forward_hook(branch_hook(i, "window")))
        hooks.append(layer.ssm.register_forward_hook(branch_hook(i, "linear")))

    state: dict = {}
    r = model.reasoning
    hooks.append(r.register_forward_pre_hook(lambda m, inputs: state.update(x=inputs[0].float())))
    hooks.append(r.gate.register_forward_hook(lambda m, inputs, out: state.update(gate=torch.sigmoid(out.float()))))

    def think_hook(module, inputs, output):
        gate, x_t = state["gate"], state["x"]
        dz = gate * output.float()
        steps.append(dict(
            dz=float(_norm(dz).mean()),
            dz_relative=float((_norm(dz) / _norm(x_t).clamp_min(1e-12)).mean()),
            gate_mean=float(gate.mean()), gate_std=float(gate.std()) if gate.numel() > 1 else 0.0,
            gate_min=float(gate.min()), gate_max=float(gate.max()), gate_open=float((gate > 0.5).float().mean()),
        ))
        state["x"] = x_t + dz

    hooks.append(r.think_mlp.register_forward_hook(think_hook))
    was_training = model.training
    model.eval()
    try:
        model.latents(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for layer in layers:
        a, s = layer.pop("window"), layer.pop("linear")
        layer["window_norm"], layer["linear_norm"] = float(a.mean()), float(s.mean())
        layer["window_share"] = float((a / (a + s).clamp_min(1e-12)).mean())
    return dict(patches=n // P, bytes_ignored=len(prompt) - n, layers=layers, reasoning=steps)


def format_report(report: dict) -> str:
    lines = [f"{report['patches']} patches" + (f" ({report['bytes_ignored']} trailing bytes of an incomplete "
                                                f"patch ignored)" if report["bytes_ignored"] else ""), "",
             "layer  ‖x‖ after  update ratio  ‖window‖  ‖linear‖  window share"]
    for i, l in enumerate(report["layers"]):
        lines.append(f"{i:5d}  {l['residual_norm']:9.3f}  {l['update_ratio']:12.4f}  {l['window_norm']:8.3f}  "
                     f"{l['linear_norm']:8.3f}  {l['window_share']:12.3f}")
    lines += ["", "think   Δz      Δz/‖z‖   gate mean  std     min     max     open"]
    for t, s in enumerate(report["reasoning"]):
        lines.append(f"{t:5d}  {s['dz']:7.3f}  {s['dz_relative']:7.4f}  {s['gate_mean']:9.3f}  {s['gate_std']:6.3f}  "
                     f"{s['gate_min']:6.3f}  {s['gate_max']:6.3f}  {s['gate_open']:6.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="our checkpoint (.pt) or an original v1 best_model.pth")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. ",
                     help="the prompt: the argument's bytes as given")
    src.add_argument("--prompt-file", help="the prompt: the whole file's bytes")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    add_model_overrides(parser)
    args = parser.parse_args(argv)
    check_common(parser, args)
    if args.prompt_file:
        prompt = _cli.read_bytes(parser, "--prompt-file", args.prompt_file)
    else:
        prompt = _cli.arg_bytes(args.prompt)
    with _cli.user_errors(parser):
        model, _ = checkpoint.load_model(args.checkpoint, device=args.device, backend=args.backend,
                                         overrides=model_overrides(args))
    try:
        report = diagnostics(model, prompt)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(report, indent=2) if args.json else format_report(report), file=sys.stdout)


if __name__ == "__main__":
    main()
