"""Entropy segmentation (docs/ops.md §1.4): our backends beside the PyTorch formulation models use,
softmax · log_softmax over the whole [B, L, V] logits, then the delta rule in tensor ops.

Roofline: ~4 FLOPs per logit is negligible; the bytes of the logits read once bound the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agiformer_kernels import entropy_segments
from benchmarks.registry import backend_available, case, impl

OP = "entropy_segments"


def logits_inputs(B, L, V):
    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"logits": torch.randn(B, L, V, device=device, dtype=dtype, generator=g) * 3}

    return make


def entropy_case(B, L, V, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    case(OP, f"B{B}-L{L}-V{V}", device, dtype, logits_inputs(B, L, V), backward=False, flops=4 * B * L * V,
         bytes=B * L * V * size, params=dict(B=B, L=L, V=V), **kw)


def _ours(backend: str):
    def run(inputs):
        return entropy_segments(inputs["logits"], rule="delta", threshold=None, delta=0.2, backend=backend)

    return run


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(OP, _name, _ours(_name), available=backend_available(_name, OP))


def softmax_entropy(inputs):
    """-sum softmax · log_softmax over the full logits (the [B, L, V] softmax in memory), then the delta rule."""
    x = inputs["logits"].float()
    logp = x.log_softmax(-1)
    h = -(logp.exp() * logp).sum(-1)
    prev = F.pad(h[:, :-1], (1, 0))
    starts = h > prev + 0.2
    starts[:, 0] = True
    return h, starts


impl(OP, "softmax-entropy", softmax_entropy, alternative=True)

entropy_case(4, 8192, 256, "cpu", torch.float32, quick=True)
entropy_case(8, 8192, 256, "cuda", torch.bfloat16)
