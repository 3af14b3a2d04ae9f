"""Top stages: what runs on each patch latent after the final norm, before the head, picked by ``top_cls``.

A top stage is position-wise (it works on ``[..., d_model]``, whatever the leading shape), so generation runs
it on one latent per step. ``slot`` is its attribute name in the model (v1's ``reasoning``).
"""

from __future__ import annotations

from ..cards import Carded
from typing import Optional

import torch.nn as nn

from agiformer_kernels.nn import RecurrentReasoningBlock

from .registry import Context, Registry, require_int

TOPS = Registry("top stage", "top_cls")


@TOPS.register("reasoning")
class Reasoning(Carded, RecurrentReasoningBlock):
    """v1's gated thinking loop: ``thinking_steps`` times (default: the model's), n = norm(x);
    x = x + σ(gate(n)) ⊙ think_mlp(n), weights shared across steps."""

    slot = "reasoning"

    def __init__(self, ctx: Context, *, thinking_steps: Optional[int] = None):
        key = "thinking_steps" if thinking_steps is not None else "thinking_steps (the model's)"
        steps = require_int(key, ctx.thinking_steps if thinking_steps is None else thinking_steps, 0)
        super().__init__(ctx.d_model, steps, ctx.dropout, backend=ctx.backend)


@TOPS.register("none")
class NoTop(Carded, nn.Identity):
    """No top stage: the final norm's output goes to the head."""

    slot = "identity"

    def __init__(self, ctx: Context):
        super().__init__()
