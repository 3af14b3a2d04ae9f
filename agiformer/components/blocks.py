"""Blocks: one layer of the stack, picked by ``block_cls``, built from its ``mixer`` (one or several, side
by side and summed), ``mlp`` and ``norm`` specs.

A block has ``forward(x [B, L, d])``, ``prefill(x) -> (y, state)`` and ``step(x [B, d], state, pos)``, its
state being the tuple of its mixers' states. A registered block's constructor takes
``(ctx, *, mixer: dict | list[dict], mlp: dict, norm: dict, **its own options)`` and builds its parts with
``registry.build``, which names the part in any error.
"""

from __future__ import annotations

from ..cards import Carded
from typing import Union

import torch
import torch.nn as nn

from .mixers import MIXERS
from .mlps import MLPS
from .norms import NORMS
from .registry import Context, Registry, build

BLOCKS = Registry("block", "block_cls", reserved=("mixer", "mlp", "norm"))
Positions = Union[int, torch.Tensor]
State = tuple


class MixerBlock(Carded, nn.Module):
    """What the blocks share: the mixers, each stored under its ``slot`` (a second mixer of the same slot gets
    ``<slot>_<index>``), summed over one input."""

    def _add_mixers(self, ctx: Context, mixer: Union[dict, list[dict]]) -> None:
        self.mixer_slots: list[str] = []
        specs = mixer if isinstance(mixer, list) else [mixer]
        for j, spec in enumerate(specs):
            where = f"{ctx.path}.mixer[{j}]" if isinstance(mixer, list) else f"{ctx.path}.mixer"
            mixer = build(MIXERS, spec, ctx, where)
            slot = getattr(mixer, "slot", spec["mixer_cls"])
            if slot in self.mixer_slots or hasattr(self, slot):
                slot = f"{slot}_{j}"
            self.add_module(slot, mixer)
            self.mixer_slots.append(slot)

    @property
    def mixers(self) -> list[nn.Module]:
        return [getattr(self, slot) for slot in self.mixer_slots]

    def _mix(self, u: torch.Tensor) -> torch.Tensor:
        outs = [m(u) for m in self.mixers]
        return _sum(outs)

    def _mix_prefill(self, u: torch.Tensor) -> tuple[torch.Tensor, State]:
        outs, states = zip(*(m.prefill(u) for m in self.mixers))
        return _sum(outs), tuple(states)

    def _mix_step(self, u: torch.Tensor, state: State, pos: Positions) -> torch.Tensor:
        return _sum([m.step(u, s, pos) for m, s in zip(self.mixers, state)])

    # Hybrid and sequential blocks: every mixer reads norm1(x), the rest is the subclass's ``_finish(x, mixed)``
    # (the parallel block overrides these three).
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, self._mix(self.norm1(x)))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        mixed, state = self._mix_prefill(self.norm1(x))
        return self._finish(x, mixed), state

    def step(self, x: torch.Tensor, state: State, pos: Positions) -> torch.Tensor:
        return self._finish(x, self._mix_step(self.norm1(x), state, pos))


def _sum(outs) -> torch.Tensor:
    total = outs[0]
    for o in outs[1:]:
        total = total + o
    return total


@BLOCKS.register("hybrid")
class HybridBlock(MixerBlock):
    """v1's block: u = norm1(x); x = x + out_proj(Σ mixers(u)); x = x + mlp(norm_mlp(x)). With v1's mixers
    (window_attention, linear_attention) its parameters are v1's ``HybridBlock``'s, key for key."""

    def __init__(self, ctx: Context, *, mixer: Union[dict, list[dict]], mlp: dict, norm: dict):
        super().__init__()
        self.norm1 = build(NORMS, norm, ctx, f"{ctx.path}.norm")
        self._add_mixers(ctx, mixer)
        self.out_proj = nn.Linear(ctx.d_model, ctx.d_model)
        self.mlp = build(MLPS, mlp, ctx, f"{ctx.path}.mlp")
        self.norm_mlp = build(NORMS, norm, ctx, f"{ctx.path}.norm")

    def _finish(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        x = x + self.out_proj(mixed)
        return x + self.mlp(self.norm_mlp(x))


@BLOCKS.register("sequential")
class SequentialBlock(MixerBlock):
    """Pre-norm transformer block: x = x + Σ mixers(norm1(x)); x = x + mlp(norm_mlp(x))."""

    def __init__(self, ctx: Context, *, mixer: Union[dict, list[dict]], mlp: dict, norm: dict):
        super().__init__()
        self.norm1 = build(NORMS, norm, ctx, f"{ctx.path}.norm")
        self._add_mixers(ctx, mixer)
        self.norm_mlp = build(NORMS, norm, ctx, f"{ctx.path}.norm")
        self.mlp = build(MLPS, mlp, ctx, f"{ctx.path}.mlp")

    def _finish(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        x = x + mixed
        return x + self.mlp(self.norm_mlp(x))


@BLOCKS.register("parallel")
class ParallelBlock(MixerBlock):
    """GPT-J / PaLM block: u = norm1(x); x = x + Σ mixers(u) + mlp(u): one norm, mixers and MLP side by side."""

    def __init__(self, ctx: Context, *, mixer: Union[dict, list[dict]], mlp: dict, norm: dict):
        super().__init__()
        self.norm1 = build(NORMS, norm, ctx, f"{ctx.path}.norm")
        self._add_mixers(ctx, mixer)
        self.mlp = build(MLPS, mlp, ctx, f"{ctx.path}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm1(x)
        return x + self._mix(u) + self.mlp(u)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        u = self.norm1(x)
        mixed, state = self._mix_prefill(u)
        return x + mixed + self.mlp(u), state

    def step(self, x: torch.Tensor, state: State, pos: Positions) -> torch.Tensor:
        u = self.norm1(x)
        return x + self._mix_step(u, state, pos) + self.mlp(u)
