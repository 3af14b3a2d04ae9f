"""Incremental generation: the prompt is run once, then each new patch costs O(1) in the context length
(for any architecture; a ``causal_attention`` layer adds O(context) for its attention over the KV cache).

Streaming state: each layer's mixer states (v1: the linear-attention state (S, z) and ring buffers of the
last ``window`` keys/values) and each row's absolute patch position (for RoPE and the ring slot). The head samples
a patch with the fused GRU sampler; the encoder turns that complete patch into the next latent.

Prompts need no padding. A prompt's complete patches are prefilled; the latent of the last one
decodes the next patch with the prompt's leftover bytes (``len % patch_size`` of them) forced as a
prefix, and the rest of that patch is sampled. Prompt rule: a prompt must hold at least one whole
patch (``patch_size`` bytes), because the model predicts bytes only from a complete patch before
them; a shorter prompt raises ValueError. Rows of a batch may have different lengths (positions are
kept per row).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .model import AGIFORMER

Prompts = Union[bytes, str, Iterable[Union[bytes, str]]]
GEMV_LAYOUT_MIN_PATCHES = 64  # patches a one-row stream must ask for before _gemv_layout pays for its copy


def _as_bytes(prompt: Union[bytes, str]) -> bytes:
    return prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)


def _merge(full, part, rows: torch.Tensor, batch: int):
    """``full`` (None: zeros) with the state ``part`` of the batch ``rows`` copied in: the same nesting of lists
    and tuples of tensors, batch first, each tensor of ``full`` grown to the larger size in every other
    dimension (a KV cache holds as many positions as its prompt; in a larger one, the extra slots are never
    read before a step writes them)."""
    if isinstance(part, (list, tuple)):
        merged = [_merge(f, p, rows, batch) for f, p in zip(full or [None] * len(part), part)]
        return merged if isinstance(part, list) else tuple(merged)
    if full is None:
        full = part.new_zeros(batch, *part.shape[1:])
    size = [max(p, f) for p, f in zip(part.shape[1:], full.shape[1:])]
    if size != list(full.shape[1:]):
        grown = full.new_zeros(batch, *size)
        grown[(slice(None), *(slice(0, n) for n in full.shape[1:]))] = full
        full = grown
    full[(rows, *(slice(0, n) for n in part.shape[1:]))] = part
    return full


@contextlib.contextmanager
def _gemv_layout(model: nn.Module) -> Iterator[None]:
    """On CPU, the weights of the widening ``nn.Linear`` layers (out > in: the qkv and first MLP projections)
    stored transposed (``weight`` a ``[out, in]`` view of an ``[in, out]`` tensor) for the context, the same
    values. A step runs each layer on one row, a matrix-vector product bound by streaming the weight from
    memory; torch's CPU product streams long contiguous rows faster: a 512 → 1536 layer read 12-13 GB/s in
    its own layout and 18-20 in this one, measured on an AVX2 CPU. The other layers' rows are already the long side
    (or equal). Costs a copy of those weights while it lasts; the originals come back on exit."""
    swapped = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and w is not None and w.device.type == "cpu"
                and module.out_features > module.in_features and w.is_contiguous()):
            swapped.append((w, w.data))
            w.data = w.data.t().contiguous().t()
    try:
        yield
    finally:
        for w, original in swapped:
            w.data = original


def _prefill(model: AGIFORMER, prompts: list[bytes], device: torch.device):
    """Prefill rows grouped by their number of whole patches -> (last latents [B, d], states, pos [B])."""
    P = model.patch_size
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p) // P, []).append(b)
    latent = states = None
    for n, rows in groups.items():
        x = torch.tensor([list(prompts[b][: n * P]) for b in rows], dtype=torch.long, device=device)
        lat, st = model.prefill(x)
        if len(groups) == 1:
            latent, states = lat, st
            break
        idx = torch.tensor(rows, device=device)
        latent = _merge(latent, lat, idx, len(prompts))
        states = _merge(states, st, idx, len(prompts))
    pos = torch.tensor([len(p) // P for p in prompts], dtype=torch.long, device=device)
    return latent, states, pos


def _first_patch(model: AGIFORMER, latent: torch.Tensor, prompts: list[bytes], sample_kw: dict) -> torch.Tensor:
    """The patch after each prompt's last whole patch, its leftover bytes forced (grouped by their count)."""
    P = model.patch_size
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p) % P, []).append(b)
    patch = torch.zeros(len(prompts), P, dtype=torch.long, device=latent.device)
    for r, rows in groups.items():
        idx = torch.tensor(rows, device=latent.device)
        prefix = None
        if r:
            prefix = torch.tensor([list(prompts[b][len(prompts[b]) - r :]) for b in rows], dtype=torch.long,
                                  device=latent.device)
        patch[idx] = model.head.sample(latent[idx], prefix=prefix, **sample_kw)
    return patch


@torch.no_grad()
def stream(model: AGIFORMER, prompts: Prompts, max_new_bytes: int, *, temperature: float = 0.0,
           top_k: Optional[int] = None, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
           stop_bytes: Union[bytes, Iterable[int], None] = None) -> Iterator[list[bytes]]:
    """Yield, once per generated patch, the new bytes of each prompt's continuation (``b""`` for a row
    that is done). A row is done after ``max_new_bytes`` bytes or after emitting one of ``stop_bytes``
    (which is kept). ``temperature`` 0 is greedy; ``top_k`` restricts sampling to the k likeliest
    bytes; ``seed`` (or ``generator``) makes sampling reproducible. The model runs in eval mode."""
    rows = [_as_bytes(prompts)] if isinstance(prompts, (bytes, str)) else [_as_bytes(p) for p in prompts]
    P = model.patch_size
    short = [i for i, p in enumerate(rows) if len(p) < P]
    if short:
        raise ValueError(
            f"prompt(s) {short} hold fewer than patch_size = {P} bytes: AGIFORMER predicts bytes only from a "
            f"complete patch before them, so a prompt needs at least {P} bytes"
        )
    if not rows or max_new_bytes <= 0:
        return
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    sample_kw = dict(temperature=temperature, top_k=top_k, generator=generator)
    stops = set(stop_bytes or ())
    was_training = model.training
    model.eval()
    try:
        # The layout pays only over a long one-row stream: for the default model the copy takes ~60 ms and
        # saves ~1.2 ms a patch (AVX2 CPU; batches were not measured).
        relayout = len(rows) == 1 and max_new_bytes >= GEMV_LAYOUT_MIN_PATCHES * P
        with model.head.cached_byte_table(), _gemv_layout(model) if relayout else contextlib.nullcontext():
            yield from _stream(model, rows, max_new_bytes, sample_kw, stops, device)
    finally:
        model.train(was_training)


def _stream(model: AGIFORMER, rows: list[bytes], max_new_bytes: int, sample_kw: dict, stops: set,
            device: torch.device) -> Iterator[list[bytes]]:
    """stream's loop, its arguments checked: prefill, then one patch per step."""
    P = model.patch_size
    latent, states, pos = _prefill(model, rows, device)
    patch = _first_patch(model, latent, rows, sample_kw)
    skip = [len(p) % P for p in rows]  # bytes of the first patch that belong to the prompt
    produced = [0] * len(rows)
    done = [False] * len(rows)
    while True:
        chunk = []
        for b, values in enumerate(patch.tolist()):
            new = b"" if done[b] else bytes(values[skip[b] :])[: max_new_bytes - produced[b]]
            cut = next((i for i, c in enumerate(new) if c in stops), None)
            if cut is not None:
                new, done[b] = new[: cut + 1], True
            produced[b] += len(new)
            done[b] = done[b] or produced[b] >= max_new_bytes
            chunk.append(new)
        yield chunk
        if all(done):
            return
        latent = model.step(patch, states, pos)
        pos += 1
        patch = model.head.sample(latent, **sample_kw)
        skip = [0] * len(rows)


def generate(model: AGIFORMER, prompts: Prompts, max_new_bytes: int, **kwargs) -> Union[bytes, list[bytes]]:
    """The continuation of each prompt (``stream``'s arguments); one ``bytes`` for a single prompt."""
    single = isinstance(prompts, (bytes, str))
    rows = [prompts] if single else list(prompts)
    pieces: list[list[bytes]] = [[] for _ in rows]
    for chunk in stream(model, rows, max_new_bytes, **kwargs):
        for piece, new in zip(pieces, chunk):
            piece.append(new)
    out = [b"".join(p) for p in pieces]
    return out[0] if single else out
