"""Look inside a checkpoint on a prompt: the layers' mixers and the reasoning loop, for any architecture.

    python -m agiformer.inspect runs/tiny/last.pt --prompt "def main():\\n    return 0\\n"
    python -m agiformer.inspect best_model.pth --prompt-file page.txt --json

Reports, averaged over the prompt's patches:
- reasoning (v1's diagnostics): per thinking step, Δz = ‖x_{t+1} − x_t‖ (absolute and relative to
  ‖x_t‖) and statistics of the gate σ(gate(n)): mean, std, min, max, share of units open (> 0.5);
- per layer: its block, the residual stream norm ‖x‖ after the layer and the update ratio
  ‖x_out − x_in‖ / ‖x_in‖; per mixer (by its name in the block: v1's window attention ``attn``, linear
  attention ``ssm``), the norm of its output and its share ‖m‖ / Σ‖m‖ of what the mixers add (for v1's
  pair also as ``window_norm``, ``linear_norm`` and ``window_share``, as before architectures existed);
- the reasoning steps only for a model whose top stage is v1's reasoning loop.
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
from agiformer_kernels.nn import RecurrentReasoningBlock

from .components.blocks import MixerBlock
from .components.config import layers as layer_specs
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
            layers[i].setdefault("mixers", {})[name] = _norm(output)
        return hook

    for i, (layer, (_, spec)) in enumerate(zip(model.layers, layer_specs(model.config))):
        layers[i]["block"] = spec["block_cls"]
        hooks.append(layer.register_forward_hook(layer_hook(i)))
        slots = layer.mixer_slots if isinstance(layer, MixerBlock) else []
        for slot in slots:
            hooks.append(getattr(layer, slot).register_forward_hook(branch_hook(i, slot)))

    state: dict = {}
    r = model.top_stage
    if isinstance(r, RecurrentReasoningBlock):
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

    if isinstance(r, RecurrentReasoningBlock):
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
        norms = layer.pop("mixers", {})
        total = sum(norms.values()).clamp_min(1e-12) if norms else None
        layer["mixers"] = {name: dict(norm=float(n.mean()), share=float((n / total).mean()))
                           for name, n in norms.items()}
        if set(norms) == {"attn", "ssm"}:  # v1's pair, under the names reports had before architectures
            layer["window_norm"], layer["linear_norm"] = layer["mixers"]["attn"]["norm"], layer["mixers"]["ssm"]["norm"]
            layer["window_share"] = layer["mixers"]["attn"]["share"]
    return dict(patches=n // P, bytes_ignored=len(prompt) - n, layers=layers, reasoning=steps)


def format_report(report: dict) -> str:
    lines = [f"{report['patches']} patches" + (f" ({report['bytes_ignored']} trailing bytes of an incomplete "
                                                f"patch ignored)" if report["bytes_ignored"] else ""), "",
             "layer  block            ‖x‖ after  update ratio  mixers: ‖output‖ (share)"]
    for i, l in enumerate(report["layers"]):
        mixers = "  ".join(f"{name} {m['norm']:.3f} ({m['share']:.3f})" for name, m in l["mixers"].items())
        lines.append(f"{i:5d}  {l['block']:15s}  {l['residual_norm']:9.3f}  {l['update_ratio']:12.4f}  {mixers}")
    if not report["reasoning"]:
        return "\n".join(lines)
    lines += ["", "think   Δz      Δz/‖z‖   gate mean  std     min     max     open"]
    for t, s in enumerate(report["reasoning"]):
        lines.append(f"{t:5d}  {s['dz']:7.3f}  {s['dz_relative']:7.4f}  {s['gate_mean']:9.3f}  {s['gate_std']:6.3f}  "
                     f"{s['gate_min']:6.3f}  {s['gate_max']:6.3f}  {s['gate_open']:6.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="our checkpoint (.pt) or an original v1 best_model.pth")
    _cli.add_prompt(parser, "The quick brown fox jumps over the lazy dog. ")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    add_model_overrides(parser)
    args = parser.parse_args(argv)
    check_common(parser, args)
    prompt = _cli.read_prompt(parser, args)
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
