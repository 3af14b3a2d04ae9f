"""The C++ extension's GRU patch ops (csrc/gru_patch/), serving the "cpu" and "cuda" backends.

``gru_patch_decode_fwd`` returns (hidden, gates, hidden_acc): gates ``[M, P, 4h]`` = r, z, n and
W_hn·h + b_hn of every step in the accumulation dtype, and hidden_acc the fp32 hidden states of an
fp16/bf16 call (empty otherwise), both only when ``save`` (a backward will follow).
``gru_patch_loss_fwd`` returns (loss ``[M, P]``, lse ``[M, P]``, hidden, gates, dh_head, dw_head, db_head) in
the accumulation dtype; with ``head_grad`` (CPU, mean/sum reductions) the last three are the head's backward
taken in the forward, to be scaled by the scalar upstream gradient; otherwise they are empty and the
backward recomputes each tile's logits from the saved log-sum-exp.
``gru_patch_sample`` takes the seed words drawn from the generator (``reference.draw_seed``) and the optional
byte table (``gru_patch_byte_table``).
"""

from __future__ import annotations

import functools

import torch

from ... import backends
from .reference import DECODE_OP, LOSS_OP, SAMPLE_OP, VOCAB, acc_dtype, draw_seed

OP_LIB = "gru_patch"
_ops = None


def decode_setup(ctx, inputs, output):
    """Autograd context of a gru_patch_decode forward op (C++ or Triton: the same outputs)."""
    context, prev_bytes, byte_emb, weight_ih, weight_hh, _, _, _ = inputs
    hidden, gates, hidden_acc = output
    ctx.mark_non_differentiable(gates, hidden_acc)
    ctx.set_materialize_grads(False)
    saved = hidden if hidden.dtype == gates.dtype else hidden_acc
    ctx.save_for_backward(context, prev_bytes, byte_emb, weight_ih, weight_hh, saved, gates)


def _register_python_side() -> None:
    """Fake kernels and autograd for the C++ ops; they can only be attached once the library is loaded."""
    global _ops
    if _ops is not None:
        return
    from ... import extension

    extension.load(OP_LIB)
    _ops = torch.ops.agiformer_kernels

    @torch.library.register_fake("agiformer_kernels::gru_patch_decode_fwd")
    def _decode_fwd_fake(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save):
        (M, h), P = context.shape, prev_bytes.shape[1]
        a = acc_dtype(context.dtype)
        gates = context.new_empty(M if save else 0, P, 4 * h, dtype=a)
        hidden_acc = context.new_empty((M, P, h) if save and context.dtype != a else (0,), dtype=a)
        return context.new_empty(M, P, h), gates, hidden_acc

    @torch.library.register_fake("agiformer_kernels::gru_patch_decode_bwd")
    def _decode_bwd_fake(grad_hidden, context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden, gates):
        return _weight_grads_fake(context)

    @torch.library.register_fake("agiformer_kernels::gru_patch_loss_fwd")
    def _loss_fwd_fake(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias,
                       sos, save, head_grad):
        (M, h), P = context.shape, targets.shape[1]
        new = functools.partial(context.new_empty, dtype=acc_dtype(context.dtype))
        kept = M if save else 0
        head = (new(M, P, h), new(VOCAB, h), new(VOCAB)) if head_grad else (new(0, P, h), new(0), new(0))
        return (new(M, P), new(M, P), new(kept, P, h), new(kept, P, 4 * h), *head)

    @torch.library.register_fake("agiformer_kernels::gru_patch_loss_bwd")
    def _loss_bwd_fake(grad_loss, context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden,
                       gates, lse, sos):
        h = context.shape[1]
        return [*_weight_grads_fake(context), context.new_empty(VOCAB, h), context.new_empty(VOCAB)]

    @torch.library.register_fake("agiformer_kernels::gru_patch_sample")
    def _sample_fake(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, patch_size,
                     temperature, top_k, prefix, sos, seed, byte_table):
        return context.new_empty(context.shape[0], patch_size, dtype=torch.int64)

    @backends.without_autocast
    def decode_backward(ctx, grad_hidden, _gates, _hidden_acc):
        if grad_hidden is None:
            return (None,) * 8
        context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden, gates = ctx.saved_tensors
        grads = _ops.gru_patch_decode_bwd(grad_hidden, context, prev_bytes, byte_emb, weight_ih, weight_hh, hidden,
                                          gates)
        dctx, demb, dw_ih, dw_hh, db_ih, db_hh = _needed(ctx, grads, (0, 2, 3, 4, 5, 6))
        return dctx, None, demb, dw_ih, dw_hh, db_ih, db_hh, None

    torch.library.register_autograd("agiformer_kernels::gru_patch_decode_fwd", decode_backward,
                                    setup_context=decode_setup)

    def loss_setup(ctx, inputs, output):
        context, targets, byte_emb, weight_ih, weight_hh, _, _, head_weight, head_bias, sos, _, head_grad = inputs
        _, lse, hidden, gates, dh_head, dw_head, db_head = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.sos, ctx.head_grad = sos, head_grad
        ctx.save_for_backward(context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden, gates,
                              lse, dh_head, dw_head, db_head)

    @backends.without_autocast
    def loss_backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 12
        (context, targets, byte_emb, weight_ih, weight_hh, head_weight, head_bias, hidden, gates, lse, dh_head,
         dw_head, db_head) = ctx.saved_tensors
        if ctx.head_grad and grad_loss.numel() > 0 and grad_loss.stride() == (0, 0):
            # a mean or sum: one scalar s scales the head gradient the forward already took
            s = grad_loss[0, 0].to(dh_head.dtype)
            prev = torch.cat([torch.full_like(targets[:, :1], ctx.sos), targets[:, :-1]], 1)
            grads = [*_ops.gru_patch_decode_bwd(dh_head * s, context, prev, byte_emb, weight_ih, weight_hh, hidden,
                                                gates), (dw_head * s).to(head_weight.dtype),
                     (db_head * s).to(head_bias.dtype)]
        else:
            grads = _ops.gru_patch_loss_bwd(grad_loss, context, targets, byte_emb, weight_ih, weight_hh, head_weight,
                                            head_bias, hidden, gates, lse, ctx.sos)
        dctx, demb, dw_ih, dw_hh, db_ih, db_hh, dhw, dhb = _needed(ctx, grads, (0, 2, 3, 4, 5, 6, 7, 8))
        return dctx, None, demb, dw_ih, dw_hh, db_ih, db_hh, dhw, dhb, None, None, None

    torch.library.register_autograd("agiformer_kernels::gru_patch_loss_fwd", loss_backward, setup_context=loss_setup)


def _weight_grads_fake(context):
    h = context.shape[1]
    new = context.new_empty
    return [new(context.shape), new(VOCAB, h), new(3 * h, 2 * h), new(3 * h, h), new(3 * h), new(3 * h)]


def _needed(ctx, grads, positions):
    """grads, with None where the matching input (by position) needs no gradient."""
    return [g if ctx.needs_input_grad[p] else None for g, p in zip(grads, positions)]


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def decode_cpp(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh):
    _register_python_side()
    save = _wants_grad(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    hidden, _, _ = _ops.gru_patch_decode_fwd(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh,
                                             save)
    return hidden


def loss_cpp(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *, sos,
             reduction):
    _register_python_side()
    save = _wants_grad(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias)
    # CPU, mean/sum: the forward also takes the head's backward (its upstream gradient is one scalar)
    head_grad = save and reduction != "none" and context.device.type == "cpu"
    loss = _ops.gru_patch_loss_fwd(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight,
                                   head_bias, sos, save, head_grad)[0]
    if reduction == "mean":
        # not loss.mean(): its backward hands the op a materialised [M, P] gradient, which the op cannot tell from
        # any other, so it would recompute the head gradient its forward already took; sum's is one broadcast scalar
        return loss.sum() / loss.numel()
    if reduction == "sum":
        return loss.sum()
    return loss


def sample_cpp(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *, patch_size,
               temperature, top_k, prefix, sos, generator, byte_table):
    _register_python_side()
    seed = draw_seed(generator, context.device) if temperature > 0 else None
    return _ops.gru_patch_sample(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias,
                                 patch_size, temperature, top_k or 0, prefix, sos, seed, byte_table)


# csrc/gru_patch/gru_patch_cuda.h: kMaxHidden, kMaxHiddenDouble (shared-memory tiles of [16, h])
MAX_CUDA_HIDDEN = {torch.float64: 256}
MAX_CUDA_HIDDEN_DEFAULT = 512


def _check_cuda(context, *args, **kwargs):
    limit = MAX_CUDA_HIDDEN.get(context.dtype, MAX_CUDA_HIDDEN_DEFAULT)
    if context.shape[1] > limit:
        return f"hidden size {context.shape[1]} > {limit} for {context.dtype}"
    return None


for _device, _check in (("cpu", backends._always), ("cuda", _check_cuda)):
    backends.register(DECODE_OP, _device, decode_cpp, check=_check,
                      available=backends.extension_kernel(OP_LIB, "gru_patch_decode_fwd", _device))
    backends.register(LOSS_OP, _device, loss_cpp, check=_check,
                      available=backends.extension_kernel(OP_LIB, "gru_patch_loss_fwd", _device))
    backends.register(SAMPLE_OP, _device, sample_cpp, check=_check,
                      available=backends.extension_kernel(OP_LIB, "gru_patch_sample", _device))
