"""The C++ extension's GRU patch decoder (csrc/gru_patch/): the "cpu" and "cuda" backends.

``torch.ops.agiformer_kernels.gru_patch_{decode,loss}_{fwd,bwd}`` and ``gru_patch_sample`` follow the schemas in
``_common``. On CPU the loss forward of a mean or sum also takes the head's backward (``head_grad``). Their fake
kernels and the forwards' autograd are attached when the library loads.
"""

from __future__ import annotations

import torch

from ... import backends
from ..common import register_autograd
from ._common import (
    DECODE_OP, LIBRARY, LOSS_OP, SAMPLE_OP, decode_autograd, decode_bwd_fake, decode_fwd_fake, draw_seed,
    loss_autograd, loss_bwd_fake, loss_fwd_fake, reduce, sample_fake, wants_grad,
)

# csrc/gru_patch/gru_patch_cuda.h: kMaxHidden, kMaxHiddenDouble (shared-memory tiles of [16, h])
MAX_CUDA_HIDDEN = {torch.float64: 256}
MAX_CUDA_HIDDEN_DEFAULT = 512


def _on_load() -> None:
    ops = torch.ops.agiformer_kernels
    for name, fake in (("gru_patch_decode_fwd", decode_fwd_fake), ("gru_patch_decode_bwd", decode_bwd_fake),
                       ("gru_patch_loss_fwd", loss_fwd_fake(early_head_grad=True)),
                       ("gru_patch_loss_bwd", loss_bwd_fake), ("gru_patch_sample", sample_fake)):
        torch.library.register_fake(f"agiformer_kernels::{name}", fake)
    register_autograd("agiformer_kernels::gru_patch_decode_fwd", decode_autograd(ops.gru_patch_decode_bwd))
    register_autograd("agiformer_kernels::gru_patch_loss_fwd",
                      loss_autograd(ops.gru_patch_loss_bwd, ops.gru_patch_decode_bwd))


def load_library(device_type: str = "cpu") -> backends.Reason:
    """Load the extension (building it if needed) with its fake and autograd registrations; why not, or None."""
    return backends.extension_available(LIBRARY, "gru_patch_decode_fwd", device_type, _on_load)(device_type)


def gru_patch_decode_cpp(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh):
    save = wants_grad(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    hidden, _, _ = torch.ops.agiformer_kernels.gru_patch_decode_fwd(
        context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, save)
    return hidden


def gru_patch_loss_cpp(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *,
                       sos, reduction):
    save = wants_grad(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias)
    # CPU, mean/sum: the forward also takes the head's backward (its upstream gradient is one scalar)
    head_grad = save and reduction != "none" and context.device.type == "cpu"
    loss = torch.ops.agiformer_kernels.gru_patch_loss_fwd(
        context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, sos, save,
        head_grad)[0]
    return reduce(loss, reduction)


def gru_patch_sample_cpp(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *,
                         patch_size, temperature, top_k, prefix, sos, generator, byte_table):
    seed = draw_seed(generator, context.device) if temperature > 0 else None
    return torch.ops.agiformer_kernels.gru_patch_sample(
        context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, patch_size, temperature,
        top_k or 0, prefix, sos, seed, byte_table)


def _check_cuda(context, *args, **kwargs) -> backends.Reason:
    limit = MAX_CUDA_HIDDEN.get(context.dtype, MAX_CUDA_HIDDEN_DEFAULT)
    if context.shape[1] > limit:
        return f"hidden size {context.shape[1]} > {limit} for {context.dtype}"
    return None


_checks = {"cpu": backends.always, "cuda": _check_cuda}
backends.register_extension(DECODE_OP, gru_patch_decode_cpp, library=LIBRARY, kernel="gru_patch_decode_fwd",
                            on_load=_on_load, checks=_checks)
backends.register_extension(LOSS_OP, gru_patch_loss_cpp, library=LIBRARY, kernel="gru_patch_loss_fwd",
                            on_load=_on_load, checks=_checks)
backends.register_extension(SAMPLE_OP, gru_patch_sample_cpp, library=LIBRARY, kernel="gru_patch_sample",
                            on_load=_on_load, checks=_checks)
