"""Fused GRU patch decoder (docs/ops.md §1.3): teacher-forced hidden states, fused loss, and sampling.

Each patch's P bytes are decoded by a 256-wide GRU (PyTorch gate layout) from the patch's
projected latent c: step t reads x_t = [byte_emb[b_t] | c], h_0 = 0, b_0 = sos.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ... import backends
from ..common import FLOAT_DTYPES, check_byte_range, check_float, check_index, check_same, check_shape
from . import cpp, reference  # noqa: F401  (each registers its backends)
from ._common import DECODE_OP, LOSS_OP, REDUCTIONS, SAMPLE_OP, VOCAB, acc_dtype

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backends)

_INF = float("inf")


def _weights_ok(context, *others) -> bool:
    """The common case in one pass (it is a sizeable share of a generation-time call at M = 1)."""
    if not isinstance(context, torch.Tensor) or context.dim() != 2 or context.dtype not in FLOAT_DTYPES:
        return False
    h = context.shape[1]
    dtype, device = context.dtype, context.device
    shapes = ((VOCAB, h), (3 * h, 2 * h), (3 * h, h), (3 * h,), (3 * h,), (VOCAB, h), (VOCAB,))
    for t, shape in zip(others, shapes):
        if not isinstance(t, torch.Tensor) or t.dtype is not dtype or t.shape != shape or t.device != device:
            return False
    return h >= 1


def _check_weights(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head=None) -> None:
    if _weights_ok(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, *(head or ())):
        return
    names = ["context", "byte_emb", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    tensors = [context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh]
    dims = [2, 2, 2, 2, 1, 1]
    if head is not None:
        names += ["head_weight", "head_bias"]
        tensors += list(head)
        dims += [2, 1]
    for name, t, ndim in zip(names, tensors, dims):
        check_float(name, t, ndim)
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    h = context.shape[1]
    if h < 1:
        raise ValueError(f"context must have shape [M, h] with h >= 1, got {tuple(context.shape)}")
    check_shape("byte_emb", byte_emb, (VOCAB, h), "[256, h]")
    check_shape("weight_ih", weight_ih, (3 * h, 2 * h), "[3h, 2h]")
    check_shape("weight_hh", weight_hh, (3 * h, h), "[3h, h]")
    check_shape("bias_ih", bias_ih, (3 * h,), "[3h]")
    check_shape("bias_hh", bias_hh, (3 * h,), "[3h]")
    if head is not None:
        check_shape("head_weight", head[0], (VOCAB, h), "[256, h]")
        check_shape("head_bias", head[1], (VOCAB,), "[256]")


def _check_bytes(name: str, t: object, context: torch.Tensor, min_steps: int = 1) -> torch.Tensor:
    check_index(name, t, 2)
    if t.shape[0] != context.shape[0] or t.shape[1] < min_steps:
        raise ValueError(
            f"{name} must have shape [M, P] with M = {context.shape[0]} of context and P >= {min_steps}, "
            f"got {tuple(t.shape)}"
        )
    if t.device != context.device:
        raise ValueError(f"{name} is on {t.device} but context is on {context.device}")
    check_byte_range(name, t)
    return t


def _check_byte_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < VOCAB:
        raise ValueError(f"{name} must be a byte value in 0..255, got {value}")
    return value


@backends.without_autocast
def gru_patch_byte_table(byte_emb: torch.Tensor, weight_ih: torch.Tensor) -> torch.Tensor:
    """The byte part of the GRU's input projection for all 256 bytes: ``byte_emb·weight_ih[:, :h]ᵀ``
    ``[256, 3h]`` in the accumulation dtype (fp32, fp64 for fp64 weights), without gradient. Step t's input
    projection is row b_t of it plus ``weight_ih[:, h:]·context``. Pass it to ``gru_patch_sample`` to
    build it once for many calls with the same weights."""
    check_float("byte_emb", byte_emb, 2)
    check_float("weight_ih", weight_ih, 2)
    check_same(["byte_emb", "weight_ih"], [byte_emb, weight_ih], "dtype")
    check_same(["byte_emb", "weight_ih"], [byte_emb, weight_ih], "device")
    h = byte_emb.shape[1]
    check_shape("byte_emb", byte_emb, (VOCAB, h), "[256, h]")
    check_shape("weight_ih", weight_ih, (3 * h, 2 * h), "[3h, 2h]")
    a = acc_dtype(byte_emb.dtype)
    with torch.no_grad():
        return (byte_emb.to(a) @ weight_ih[:, :h].to(a).T).contiguous()


def _check_byte_table(table: object, context: torch.Tensor) -> None:
    check_float("byte_table", table, 2)
    h = context.shape[1]
    check_shape("byte_table", table, (VOCAB, 3 * h), "[256, 3h]")
    a = acc_dtype(context.dtype)
    if table.dtype != a:
        raise TypeError(f"byte_table must be {a} (the accumulation dtype of {context.dtype}), got {table.dtype}")
    if table.device != context.device:
        raise ValueError(f"byte_table is on {table.device} but context is on {context.device}")


@backends.without_autocast
def gru_patch_decode(
    context: torch.Tensor,
    prev_bytes: torch.Tensor,
    byte_emb: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Teacher-forced hidden states of the GRU patch decoder.

    Args:
        context: ``[M, h]``, the projected latent of each of M patches.
        prev_bytes: ``[M, P]`` integer bytes fed at each step (= ``[sos, y_0 .. y_{P-2}]``).
        byte_emb: ``[256, h]``; weight_ih: ``[3h, 2h]`` (``nn.GRU.weight_ih_l0``, input
            ``[byte_emb[b] | context]``); weight_hh: ``[3h, h]``; bias_ih, bias_hh: ``[3h]``.
            All floats share one dtype and device.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        hidden ``[M, P, h]`` = h_1 .. h_P (h_0 = 0) in the input dtype. Differentiable in all floats.
    """
    _check_weights(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    _check_bytes("prev_bytes", prev_bytes, context)
    args = (context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    return backends.select(DECODE_OP, backend, context.device, *args)(*args)


@backends.without_autocast
def gru_patch_loss(
    context: torch.Tensor,
    targets: torch.Tensor,
    byte_emb: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    *,
    sos: int = 0,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Teacher-forced cross-entropy of the decoder's byte predictions, without materialising logits.

    Args:
        context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh: as for ``gru_patch_decode``.
        targets: ``[M, P]`` integer bytes; step t is fed ``targets[:, t-1]`` (``sos`` at t = 0) and
            predicts ``targets[:, t]`` with logits_t = head_weight·h_t + head_bias.
        head_weight: ``[256, h]``; head_bias: ``[256]``.
        sos: the byte fed at step 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per byte, ``[M, P]``).

    Returns:
        The loss in nats, fp32 (fp64 for fp64 inputs). Differentiable in all floats.
    """
    head = (head_weight, head_bias)
    _check_weights(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head)
    _check_bytes("targets", targets, context)
    sos = _check_byte_int("sos", sos)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    args = (context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias)
    kwargs = dict(sos=sos, reduction=reduction)
    return backends.select(LOSS_OP, backend, context.device, *args, **kwargs)(*args, **kwargs)


@backends.without_autocast
def gru_patch_sample(
    context: torch.Tensor,
    byte_emb: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    *,
    patch_size: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    prefix: Optional[torch.Tensor] = None,
    sos: int = 0,
    generator: Optional[torch.Generator] = None,
    byte_table: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sample each patch's bytes, feeding every byte back as the next step's input (inference only).

    Args:
        context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias: as for
            ``gru_patch_loss``.
        patch_size: P, the bytes per patch.
        temperature: 0 takes the argmax (first index on ties, as ``torch.argmax``); > 0 samples
            softmax(logits / temperature).
        top_k: sample among the top_k logits only (ties with the k-th largest kept); None: all 256.
        prefix: optional integer ``[M, r]``, r < patch_size: the first r bytes are forced (fed back and
            returned as given) and the rest sampled.
        sos: the byte fed at step 0.
        generator: seeds the in-kernel counter-based RNG (one draw per call when temperature > 0):
            the same generator state gives the same bytes. None: the default generator.
        byte_table: ``gru_patch_byte_table(byte_emb, weight_ih)`` of these weights, or None to build it
            in the call. A caller that samples many times with the same weights (generation) builds it
            once: it is a 256×3h×h GEMM, several times the rest of a call at small M. A table of other
            weights gives wrong bytes: it is not checked against them.

    Returns:
        ``[M, patch_size]`` int64 bytes.
    """
    args = (context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias)
    if not (type(patch_size) is int and patch_size >= 1 and type(temperature) is float and 0 <= temperature < _INF
            and top_k is None and prefix is None and type(sos) is int and 0 <= sos < VOCAB and generator is None):
        patch_size, temperature, top_k, sos = _check_sample_args(patch_size, temperature, top_k, sos, generator)
    _check_weights(*args[:6], args[6:])
    if prefix is not None:
        _check_prefix(prefix, context, patch_size)
    if byte_table is not None:
        _check_byte_table(byte_table, context)
    impl = backends.select(SAMPLE_OP, backend, context.device, *args)
    return impl(*args, patch_size=patch_size, temperature=temperature, top_k=top_k, prefix=prefix, sos=sos,
                generator=generator, byte_table=byte_table)


def _check_prefix(prefix, context, patch_size):
    _check_bytes("prefix", prefix, context, min_steps=0)
    if prefix.shape[1] >= patch_size:
        raise ValueError(f"prefix must have fewer than patch_size = {patch_size} columns, got {tuple(prefix.shape)}")


def _check_sample_args(patch_size, temperature, top_k, sos, generator):
    """gru_patch_sample's scalar arguments, checked: (patch_size, temperature as a float, top_k, sos)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size must be an int, got {type(patch_size).__name__}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if not 1 <= top_k <= VOCAB:
            raise ValueError(f"top_k must be in 1..256, got {top_k}")
    sos = _check_byte_int("sos", sos)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return patch_size, temperature, top_k, sos


__all__ = ["gru_patch_byte_table", "gru_patch_decode", "gru_patch_loss", "gru_patch_sample"]
