"""What every GRU patch decoder backend shares: names, dtypes, the seed, the kernels' forward/backward contract.

The C++ and Triton ops have one schema each:
- ``decode_fwd(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save)`` ->
  (hidden ``[M, P, h]``, gates ``[M, P, 4h]`` = r, z, n and W_hn·h + b_hn of every step in the accumulation
  dtype, hidden_acc: the fp32 hidden states of an fp16/bf16 call, else empty); gates and hidden_acc only when
  ``save`` (a backward will follow).
- ``decode_bwd(grad_hidden, context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden, gates)`` -> the
  gradients of (context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh).
- ``loss_fwd(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, sos,
  save, head_grad)`` -> (loss ``[M, P]``, lse ``[M, P]``, hidden, gates, dh_head, dw_head, db_head) in the
  accumulation dtype. With ``head_grad`` (a mean or sum reduction, whose upstream gradient is one scalar) the
  last three are the head's backward taken in the forward, to be scaled by that scalar; otherwise they are empty
  and the backward recomputes each tile's logits from the saved log-sum-exp. Backends that do not take the head's
  backward early return them empty whatever ``head_grad`` says.
- ``loss_bwd(grad_loss, context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden, gates,
  lse, sos)`` -> the decoder's six gradients and the head's two.
- ``sample(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, patch_size,
  temperature, top_k, prefix, sos, seed, byte_table)`` -> ``[M, patch_size]`` int64 bytes; ``seed`` from
  ``draw_seed``, ``top_k`` 0 for all 256.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ... import backends

DECODE_OP = "gru_patch_decode"
LOSS_OP = "gru_patch_loss"
SAMPLE_OP = "gru_patch_sample"
LIBRARY = "gru_patch"  # csrc/gru_patch/
VOCAB = 256
REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, else fp32 (also the dtype of losses and logits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def teacher_inputs(targets: torch.Tensor, sos: int) -> torch.Tensor:
    """prev_bytes = [sos, targets[:, :-1]]: the byte fed at each step under teacher forcing."""
    first = torch.full_like(targets[:, :1], sos)
    return torch.cat([first, targets[:, :-1]], 1)


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Two 32-bit seed words ``[2]`` int64 on ``device``, drawn from ``generator`` (advancing it)."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, generator=generator, device=gen_device)
    return seed.to(device)


def wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether a backward can follow: then the forward keeps what it needs (``save``)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-byte loss reduced. A mean is taken as sum / n, not ``loss.mean()``: a sum's gradient reaches the op
    as one broadcast scalar, which lets the C++ backward reuse the head gradient its forward took, while a mean's
    backward would hand it a materialised ``[M, P]`` tensor it cannot tell from any other gradient."""
    if reduction == "mean":
        return loss.sum() / loss.numel()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels of the schemas above


def weight_grads_fake(context):
    h = context.shape[1]
    new = context.new_empty
    return [new(context.shape), new(VOCAB, h), new(3 * h, 2 * h), new(3 * h, h), new(3 * h), new(3 * h)]


def decode_fwd_fake(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save):
    (M, h), P = context.shape, prev_bytes.shape[1]
    a = acc_dtype(context.dtype)
    gates = context.new_empty(M if save else 0, P, 4 * h, dtype=a)
    hidden_acc = context.new_empty((M, P, h) if save and context.dtype != a else (0,), dtype=a)
    return context.new_empty(M, P, h), gates, hidden_acc


def decode_bwd_fake(grad_hidden, context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden, gates):
    return weight_grads_fake(context)


def loss_fwd_fake(early_head_grad: bool) -> Callable:
    """The loss forward's fake kernel, for a backend that does (C++ on CPU) or does not take the head's backward
    in the forward."""

    def fake(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, sos, save,
             head_grad):
        (M, h), P = context.shape, targets.shape[1]
        new = functools.partial(context.new_empty, dtype=acc_dtype(context.dtype))
        kept = M if save else 0
        if head_grad and early_head_grad:
            head = (new(M, P, h), new(VOCAB, h), new(VOCAB))
        else:
            head = (new(0, P, h), new(0), new(0))
        return (new(M, P), new(M, P), new(kept, P, h), new(kept, P, 4 * h), *head)

    return fake


def loss_bwd_fake(grad_loss, context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden, gates,
                  lse, sos):
    h = context.shape[1]
    return [*weight_grads_fake(context), context.new_empty(VOCAB, h), context.new_empty(VOCAB)]


def sample_fake(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, patch_size,
                temperature, top_k, prefix, sos, seed, byte_table):
    return context.new_empty(context.shape[0], patch_size, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Autograd of the forward ops


def _needed(ctx, grads, positions):
    """grads, with None where the matching input (by position) needs no gradient."""
    return [g if ctx.needs_input_grad[p] else None for g, p in zip(grads, positions)]


def decode_autograd(decode_bwd: Callable) -> tuple[Callable, Callable]:
    """``backward`` and ``setup_context`` of a decode forward op, calling the backward op ``decode_bwd``."""

    def setup_context(ctx, inputs, output):
        context, prev_bytes, byte_emb, weight_ih, weight_hh, _, _, _ = inputs
        hidden, gates, hidden_acc = output
        ctx.mark_non_differentiable(gates, hidden_acc)
        ctx.set_materialize_grads(False)
        saved = hidden if hidden.dtype == gates.dtype else hidden_acc
        ctx.save_for_backward(context, prev_bytes, byte_emb, weight_ih, weight_hh, saved, gates)

    @backends.without_autocast
    def backward(ctx, grad_hidden, _gates, _hidden_acc):
        if grad_hidden is None:
            return (None,) * 8
        grads = decode_bwd(grad_hidden, *ctx.saved_tensors)
        dctx, demb, dw_ih, dw_hh, db_ih, db_hh = _needed(ctx, grads, (0, 2, 3, 4, 5, 6))
        return dctx, None, demb, dw_ih, dw_hh, db_ih, db_hh, None

    return backward, setup_context


def loss_autograd(loss_bwd: Callable, decode_bwd: Callable) -> tuple[Callable, Callable]:
    """``backward`` and ``setup_context`` of a loss forward op: ``loss_bwd``, or, where the forward took the head's
    backward already, ``decode_bwd`` from that head gradient."""

    def setup_context(ctx, inputs, output):
        context, targets, byte_emb, weight_ih, weight_hh, _, _, head_weight, head_bias, sos, _, _ = inputs
        _, lse, hidden, gates, dh_head, dw_head, db_head = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.sos = sos
        ctx.save_for_backward(context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden, gates,
                              lse, dh_head, dw_head, db_head)

    @backends.without_autocast
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 12
        (context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden, gates, lse, dh_head,
         dw_head, db_head) = ctx.saved_tensors
        if dw_head.numel() > 0 and grad_loss.numel() > 0 and grad_loss.stride() == (0, 0):
            # a mean or sum: one scalar s scales the head gradient the forward already took
            s = grad_loss[0, 0].to(dh_head.dtype)
            prev = teacher_inputs(targets, ctx.sos)
            grads = [*decode_bwd(dh_head * s, context, prev, byte_emb, weight_ih, weight_hh, hidden, gates),
                     (dw_head * s).to(head_weight.dtype), (db_head * s).to(head_bias.dtype)]
        else:
            grads = loss_bwd(grad_loss, context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias,
                             hidden, gates, lse, ctx.sos)
        dctx, demb, dw_ih, dw_hh, db_ih, db_hh, dhw, dhb = _needed(ctx, grads, (0, 2, 3, 4, 5, 6, 7, 8))
        return dctx, None, demb, dw_ih, dw_hh, db_ih, db_hh, dhw, dhb, None, None, None

    return backward, setup_context
