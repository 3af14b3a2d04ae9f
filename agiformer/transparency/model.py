"""``AgiformerTransparentLlm``: the ``TransparentLlm`` of any AGIFORMER architecture (docs/transparency.md).

Positions are patches: token i is the i-th complete patch of P bytes, and its latent predicts the bytes of
patch i + 1. Every attention head of a layer, over all its mixers in mixer order, is one head index
(v1: window heads 0..H−1, linear heads H..2H−1). Every per-head quantity is written as

    c[i, j, h] = A_h[i, j] · s_h[i] · u_h[j]

with A_h the head's attention matrix, s_h[i] a per-target scale (1 for softmax heads; 1/σ_i for the linear
branch, whose LayerNorm after out_proj is linear once its statistics at position i are frozen) and u_h[j]
the source's value carried through every linear map up to the residual stream. The biases no source owns
are ``attention_bias``. Norms of ``c`` are then |A·s|·‖u‖, which is how ``attention_contributions`` gets
``[N, N, heads]`` without the ``[N, N, heads, d]`` of ``decomposed_attn``.
"""

from __future__ import annotations

import copy
import operator
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from agiformer_kernels import linear_attention
from agiformer_kernels.nn.linear_attention import EPS, FEATURE_EPS
from agiformer_kernels.ops.linear_attention.reference import feature

from .. import checkpoint
from ..components.blocks import HybridBlock, ParallelBlock, SequentialBlock
from ..components.config import layers as layer_specs
from ..components.mixers import CausalAttention, LinearAttentionMixer, WindowAttention
from ..components.mlps import ACTIVATIONS, GLU, GeluMLP
from ..generation import _as_bytes
from ..model import AGIFORMER, num_parameters
from .interface import ModelInfo, Sentences, TransparentLlm

BLOCK_KINDS = {HybridBlock: "hybrid", SequentialBlock: "sequential", ParallelBlock: "parallel"}
MIXER_KINDS = {WindowAttention: "window", CausalAttention: "window", LinearAttentionMixer: "linear"}
MLP_KINDS = {GeluMLP: "mlp", GLU: "glu"}
PAD = -1  # the token id of a padding position (past a row's length)
MAX_PATCH_SIZE = 7  # 256 + 256**P must fit an int64 patch id


@dataclass(frozen=True)
class Head:
    """One head of a layer: its mixer (the block's attribute name and registry name) and index in it."""

    mixer: str
    mixer_cls: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.mixer}.{self.index}"


@dataclass
class _Mixer:
    """One mixer's part of a run: q, k, v ``[B, N, H, E]``; σ ``[B, N]`` of the linear branch's norm."""

    kind: str
    window: Optional[int]  # None: every earlier position (causal attention)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sigma: Optional[torch.Tensor] = None


@dataclass
class _Layer:
    residual_in: torch.Tensor
    attn: torch.Tensor
    residual_after_attn: torch.Tensor
    ffn_in: torch.Tensor
    ffn: torch.Tensor
    residual_out: torch.Tensor
    mixers: list[_Mixer]


@dataclass
class _Run:
    x: torch.Tensor  # the bytes [B, N·P], zero-padded
    lengths: list[int]  # patches per row
    ignored: list[int]  # trailing bytes of an incomplete patch dropped per row
    layers: list[_Layer]
    logits: torch.Tensor
    latents: torch.Tensor  # what the head reads [B, N, d]


def _index(name: str, value, size: int, what: str) -> int:
    """``value`` as an index into ``size`` things (negative counts from the end); ValueError naming it."""
    try:
        i = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not -size <= i < size:
        raise ValueError(f"{name} = {i}: {what} has {size} (0..{size - 1})")
    return i % size


def render(data: bytes) -> str:
    """Bytes as display text: UTF-8 where it decodes, ``\\xNN`` for the bytes that do not, and escapes
    (``\\n``, ``\\t``, ``\\x00``) for characters that do not print."""
    text = data.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class AgiformerTransparentLlm(TransparentLlm):
    """The ``TransparentLlm`` of an AGIFORMER model of any registry architecture (docs/transparency.md).

    ``model_or_checkpoint_path``: an ``AGIFORMER`` (used as it is; with ``device`` or ``dtype`` a converted
    copy, the caller's model untouched) or a checkpoint any of our tools loads (``backend`` goes to its ops).
    Blocks ``hybrid``, ``sequential`` and ``parallel``; mixers ``window_attention``, ``causal_attention``
    and ``linear_attention``; MLPs ``mlp`` and ``glu``; any norm, embedding, top stage and head. Another
    block, mixer or MLP is a ``NotImplementedError`` naming it.

    Token ids (``tokens``): a patch of bytes b_0..b_{P−1} is 256 + the big-endian integer of its bytes
    (≥ 256); a byte is its value (< 256), as ``unembed``'s vocabulary indexes bytes; a padding position is
    −1. ``tokens_to_strings`` renders either kind.
    """

    def __init__(self, model_or_checkpoint_path: Union[AGIFORMER, str, os.PathLike], *,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None):
        source = model_or_checkpoint_path
        if isinstance(source, AGIFORMER):
            if backend is not None:
                raise ValueError("backend: only for a checkpoint path; a model keeps the backend it was built with")
            model, name = source, "AGIFORMER"
            if device is not None or dtype is not None:
                model = copy.deepcopy(model).to(device=device, dtype=dtype)
        elif isinstance(source, (str, os.PathLike)):
            model, _ = checkpoint.load_model(source, device="cpu" if device is None else device, backend=backend)
            model, name = model.to(dtype=dtype), f"AGIFORMER ({os.fspath(source)})"
        else:
            raise TypeError(f"model_or_checkpoint_path must be an AGIFORMER or a checkpoint path, "
                            f"got {type(source).__name__}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if model.patch_size > MAX_PATCH_SIZE:
            raise NotImplementedError(f"patch_size = {model.patch_size}: patch ids are int64, which holds "
                                      f"patches of at most {MAX_PATCH_SIZE} bytes")
        self.model = model
        self._name = name
        self._plan = [self._layer_plan(path, spec, layer)
                      for (path, spec), layer in zip(layer_specs(model.config), model.layers)]
        self._state: Optional[_Run] = None

    @staticmethod
    def _layer_plan(path: str, spec: dict, layer) -> dict:
        if type(layer) not in BLOCK_KINDS:
            raise NotImplementedError(f"{path}: block {spec['block_cls']!r} is not decomposed; one of "
                                      f"{', '.join(BLOCK_KINDS.values())}")
        mixer_specs = spec["mixer"] if isinstance(spec["mixer"], list) else [spec["mixer"]]
        heads = []
        for slot, mixer_spec in zip(layer.mixer_slots, mixer_specs):
            if type(getattr(layer, slot)) not in MIXER_KINDS:
                raise NotImplementedError(f"{path}: mixer {mixer_spec['mixer_cls']!r} is not decomposed; "
                                          f"window_attention, causal_attention and linear_attention are")
            heads += [Head(slot, mixer_spec["mixer_cls"], h) for h in range(getattr(layer, slot).num_heads)]
        if type(layer.mlp) not in MLP_KINDS:
            raise NotImplementedError(f"{path}: mlp {spec['mlp']['mlp_cls']!r} is not decomposed; one of "
                                      f"{', '.join(MLP_KINDS.values())}")
        return dict(block=BLOCK_KINDS[type(layer)], heads=heads, mlp=MLP_KINDS[type(layer.mlp)])

    # Info and state.

    def model_info(self) -> ModelInfo:
        n = num_parameters(self.model)
        cfg = self.model.config
        return ModelInfo(name=self._name, n_params_estimate=int(float(f"{n:.1g}")), n_layers=len(self._plan),
                         n_heads=max(len(p["heads"]) for p in self._plan), d_model=cfg["d_model"], d_vocab=256)

    def layer_heads(self, layer: int) -> list[Head]:
        """The heads of ``layer`` in head-index order (a layer may have fewer than ``model_info().n_heads``)."""
        return list(self._plan[self._layer(layer)]["heads"])

    def copy(self) -> "AgiformerTransparentLlm":
        return copy.copy(self)  # a run replaces the state, never changes it in place

    @property
    def _run(self) -> _Run:
        if self._state is None:
            raise RuntimeError("no state yet: call run(sentences) first")
        return self._state

    def _layer(self, layer) -> int:
        return _index("layer", layer, len(self._plan), "the model's layers")

    def _row(self, batch_i) -> int:
        return _index("batch_i", batch_i, len(self._run.lengths), "the last run's rows")

    def _pos(self, batch_i: int, pos) -> int:
        return _index("pos", pos, self._run.lengths[batch_i], f"row {batch_i}'s patches")

    def _head(self, layer: int, head) -> int:
        return _index("head", head, len(self._plan[layer]["heads"]), f"layer {layer}'s heads")

    def lengths(self) -> list[int]:
        """Patches of each row of the last run; positions past them are padding."""
        return list(self._run.lengths)

    def batch_size(self) -> int:
        return len(self._run.lengths)

    # Running.

    @torch.no_grad()
    def run(self, sentences: Sentences) -> None:
        """``sentences``: strings (as UTF-8) or bytes, or one of them; rows of different lengths are padded
        with zero bytes after their last complete patch. Trailing bytes of an incomplete patch are dropped
        (the model never reads them); a row shorter than one patch is a ``ValueError``."""
        single = isinstance(sentences, (str, bytes, bytearray))
        rows = [_as_bytes(s) for s in ([sentences] if single else list(sentences))]
        if not rows:
            raise ValueError("sentences: empty; give at least one")
        P = self.model.patch_size
        for i, r in enumerate(rows):
            if len(r) < P:
                raise ValueError(f"sentences[{i}]: {len(r)} bytes, less than one patch ({P} bytes)")
        lengths = [len(r) // P for r in rows]
        device = next(self.model.parameters()).device
        x = torch.zeros(len(rows), max(lengths) * P, dtype=torch.long, device=device)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            x[i, : n * P] = torch.tensor(list(r[: n * P]), dtype=torch.long)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            z = model.encoder(x)
            layers = []
            for plan, block in zip(self._plan, model.layers):
                layers.append(self._run_layer(plan, block, z))
                z = layers[-1].residual_out
            latents = model._top(z)
            logits = self._first_byte_logits(latents)
        finally:
            model.train(was_training)
        self._state = _Run(x=x, lengths=lengths, ignored=[len(r) - n * P for r, n in zip(rows, lengths)],
                           layers=layers, logits=logits, latents=latents)

    def _run_layer(self, plan: dict, block, x: torch.Tensor) -> _Layer:
        """The block's forward (``blocks.py``), step by step, keeping each step."""
        u = block.norm1(x)
        mixers = [self._run_mixer(m, u) for m in block.mixers]
        mixed = block._mix(u)
        attn = block.out_proj(mixed) if plan["block"] == "hybrid" else mixed
        after = x + attn
        ffn_in = u if plan["block"] == "parallel" else block.norm_mlp(after)
        ffn = block.mlp(ffn_in)
        return _Layer(residual_in=x, attn=attn, residual_after_attn=after, ffn_in=ffn_in, ffn=ffn,
                      residual_out=after + ffn, mixers=mixers)

    @staticmethod
    def _run_mixer(m, u: torch.Tensor) -> _Mixer:
        q, k, v = m._split(u)
        if MIXER_KINDS[type(m)] == "window":
            return _Mixer("window", getattr(m, "window_size", None), q, k, v)
        # The linear branch's LayerNorm statistics, from the same out_proj output the mixer normalises.
        o = linear_attention(q, k, v, feature_eps=FEATURE_EPS, eps=EPS, backend=m.backend)
        w = m.out_proj(o.flatten(-2))
        sigma = torch.sqrt(w.var(-1, unbiased=False) + m.norm.eps)
        return _Mixer("linear", None, q, k, v, sigma)

    # Tokens and the unembedding.

    def tokens(self) -> torch.Tensor:
        run = self._run
        B, P = len(run.lengths), self.model.patch_size
        patches = run.x.view(B, -1, P)
        weights = 256 ** torch.arange(P - 1, -1, -1, device=patches.device)
        ids = 256 + (patches * weights).sum(-1)
        for b, n in enumerate(run.lengths):
            ids[b, n:] = PAD
        return ids

    def tokens_to_strings(self, tokens) -> list[str]:
        P = self.model.patch_size
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        out = []
        for i, t in enumerate(ids):
            if not isinstance(t, int):
                raise TypeError(f"tokens[{i}] = {t!r}: ids are ints")
            if t == PAD:
                out.append("")
            elif 0 <= t < 256:
                out.append(render(bytes([t])))
            elif 256 <= t < 256 + 256**P:
                out.append(render((t - 256).to_bytes(P, "big")))
            else:
                raise ValueError(f"tokens[{i}] = {t}: neither a byte (0..255), a patch id (256..256 + 256**{P} − 1) "
                                 f"nor padding ({PAD})")
        return out

    def _first_byte_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """The head's first step (from byte 0, as every patch starts) on latents ``[..., d]`` -> ``[..., 256]``."""
        lead, d = latents.shape[:-1], latents.shape[-1]
        flat = latents.reshape(1, -1, d)
        targets = torch.zeros(flat.shape[1] * self.model.patch_size, dtype=torch.long, device=latents.device)
        return self.model.head(flat, targets)[0, :, 0].reshape(*lead, -1)

    @torch.no_grad()
    def unembed(self, t: torch.Tensor, normalize: bool) -> torch.Tensor:
        """``t`` ``[..., d]`` -> the next patch's first-byte logits ``[..., 256]``: the final norm (when
        ``normalize``), the top stage (v1's reasoning loop), then the head's first step."""
        model = self.model
        if t.shape[-1:] != (self.model.config["d_model"],):
            raise ValueError(f"t: shape {tuple(t.shape)}, expected [..., d_model = {self.model.config['d_model']}]")
        p = next(model.parameters())
        x = t.to(device=p.device, dtype=p.dtype)
        was_training = model.training
        model.eval()
        try:
            return self._first_byte_logits(model.top_stage(model.norm_f(x) if normalize else x))
        finally:
            model.train(was_training)

    def logits(self) -> torch.Tensor:
        """``[B, N, 256]``: position i's distribution of the first byte of patch i + 1."""
        return self._run.logits

    @torch.no_grad()
    def patch_logits(self) -> torch.Tensor:
        """``[B, N, P, 256]``: every byte of patch i + 1 at position i, byte k given bytes 0..k−1 of that
        patch: the prompt's own where it has patch i + 1, the greedy (argmax) bytes at a row's last position."""
        run, model = self._run, self.model
        P = model.patch_size
        was_training = model.training
        model.eval()
        try:
            targets = model.head(run.latents).clone()  # greedy bytes [B, N, P]
            for b, n in enumerate(run.lengths):
                targets[b, : n - 1] = run.x[b, P : n * P].view(n - 1, P)
            return model.head(run.latents, targets.flatten(1))
        finally:
            model.train(was_training)

    # The residual stream and the FFN.

    def residual_in(self, layer: int) -> torch.Tensor:
        return self._run.layers[self._layer(layer)].residual_in

    def residual_after_attn(self, layer: int) -> torch.Tensor:
        return self._run.layers[self._layer(layer)].residual_after_attn

    def residual_out(self, layer: int) -> torch.Tensor:
        return self._run.layers[self._layer(layer)].residual_out

    def ffn_out(self, layer: int) -> torch.Tensor:
        return self._run.layers[self._layer(layer)].ffn

    def _ffn_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The FFN's output weight ``[d, d_ffn]`` and bias ``[d]``."""
        mlp = self.model.layers[layer].mlp
        out = mlp[2] if self._plan[layer]["mlp"] == "mlp" else mlp.fc2
        return out.weight, out.bias

    @torch.no_grad()
    def neuron_activations(self, batch_i: int, layer: int, pos: int) -> torch.Tensor:
        layer, b = self._layer(layer), self._row(batch_i)
        x = self._run.layers[layer].ffn_in[b, self._pos(b, pos)]
        mlp = self.model.layers[layer].mlp
        if self._plan[layer]["mlp"] == "mlp":
            return F.gelu(mlp[0](x))
        a, gate = mlp.fc1(x).chunk(2, dim=-1)
        return ACTIVATIONS[mlp.act_fn](a) * gate

    def neuron_output(self, layer: int, neuron: int) -> torch.Tensor:
        layer = self._layer(layer)
        weight, _ = self._ffn_weights(layer)
        return weight[:, _index("neuron", neuron, weight.shape[1], f"layer {layer}'s FFN")].detach()

    def ffn_bias(self, layer: int) -> torch.Tensor:
        """The FFN output bias ``[d]``: ``decomposed_ffn_out(...).sum(0) + ffn_bias(layer)`` is ``ffn_out``."""
        _, bias = self._ffn_weights(self._layer(layer))
        return bias.detach()

    @torch.no_grad()
    def decomposed_ffn_out(self, batch_i: int, layer: int, pos: int) -> torch.Tensor:
        act = self.neuron_activations(batch_i, layer, pos)
        weight, _ = self._ffn_weights(self._layer(layer))
        return act[:, None] * weight.T

    # Attention.

    def _acc(self) -> torch.dtype:
        return torch.promote_types(next(self.model.parameters()).dtype, torch.float32)

    def _matrix(self, mixer: _Mixer, b: int, n: int, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop−1 of the mixer's attention matrices ``[H, T, n]``, as its op computes them."""
        acc = self._acc()
        q, k = mixer.q[b, start:stop].to(acc), mixer.k[b, :n].to(acc)
        i = torch.arange(start, stop, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None]
        causal = j <= i
        if mixer.kind == "window":
            scores = torch.einsum("thd,jhd->htj", q, k) * q.shape[-1] ** -0.5
            band = causal if mixer.window is None else causal & (j > i - mixer.window)
            return scores.masked_fill(~band, float("-inf")).softmax(-1)
        # Linear attention (docs/ops.md §1.1): A_ij = q̂_i·k̂_j / (q̂_i·z_i + eps), z_i = Σ_{j≤i} k̂_j.
        qh = feature(q, "elu+1", FEATURE_EPS) * q.shape[-1] ** -0.5
        kh = feature(k, "elu+1", FEATURE_EPS)
        z = kh.cumsum(0)[start:stop]
        scores = torch.einsum("thd,jhd->htj", qh, kh).masked_fill(~causal, 0.0)
        return scores / (torch.einsum("thd,thd->ht", qh, z) + EPS)[..., None]

    def _weights(self, b: int, layer: int, start: int, stop: int) -> torch.Tensor:
        """A_h[i, j] · s_h[i] for targets start..stop−1 ``[T, n, heads]``."""
        n = self._run.lengths[b]
        parts = []
        for mixer in self._run.layers[layer].mixers:
            a = self._matrix(mixer, b, n, start, stop)
            if mixer.sigma is not None:
                a = a / mixer.sigma[b, start:stop].to(a.dtype)[None, :, None]
            parts.append(a)
        return torch.cat(parts).permute(1, 2, 0)

    @torch.no_grad()
    def _values(self, b: int, layer: int) -> torch.Tensor:
        """u_h[j] ``[n, heads, d]``: each source's value carried to the residual stream by the linear maps
        after the attention (the mixer's projection; the linear branch's frozen norm without its 1/σ_i;
        a hybrid block's out_proj)."""
        n = self._run.lengths[b]
        values = [mixer.v[b, :n] for mixer in self._run.layers[layer].mixers]
        return torch.einsum("jhe,hde->jhd", torch.cat(values, dim=1).to(self._acc()), self._head_maps(layer))

    def _head_maps(self, layer: int) -> torch.Tensor:
        """``[heads, d, E]``: each head's value to the residual stream, the maps after the attention composed
        (the projection's columns of the head; for the linear branch centring and the norm's weight; a hybrid
        block's out_proj)."""
        acc = self._acc()
        block = self.model.layers[layer]
        maps = []
        for mixer, m in zip(self._run.layers[layer].mixers, block.mixers):
            H, E = mixer.v.shape[2:]
            proj = (m.proj if mixer.kind == "window" else m.out_proj).weight.to(acc)
            if mixer.kind == "linear":  # γ ⊙ (w − mean(w)) is (diag γ)(I − 11ᵀ/d) w
                proj = (proj - proj.mean(0, keepdim=True)) * m.norm.weight.to(acc)[:, None]
            maps.append(proj.view(-1, H, E).transpose(0, 1))
        maps = torch.cat(maps)
        if self._plan[layer]["block"] == "hybrid":
            maps = block.out_proj.weight.to(acc) @ maps
        return maps

    @torch.no_grad()
    def attention_bias(self, batch_i: int, layer: int) -> torch.Tensor:
        """``[n, d]``: what the attention adds at each position that no source owns (the projections' biases;
        the linear branch's norm shift and centred, scaled out_proj bias), so that
        ``decomposed_attn(b, l).sum((1, 2)) + attention_bias(b, l)`` is the attention's output."""
        layer, b = self._layer(layer), self._row(batch_i)
        acc, n = self._acc(), self._run.lengths[b]
        block = self.model.layers[layer]
        d = self.model.config["d_model"]
        total = torch.zeros(n, d, dtype=acc, device=self._run.x.device)
        for mixer, m in zip(self._run.layers[layer].mixers, block.mixers):
            if mixer.kind == "window":
                total = total + m.proj.bias.to(acc)
            else:
                c = m.out_proj.bias.to(acc)
                c = (c - c.mean()) * m.norm.weight.to(acc) / mixer.sigma[b, :n, None].to(acc)
                total = total + c + m.norm.bias.to(acc)
        if self._plan[layer]["block"] == "hybrid":
            total = total @ block.out_proj.weight.to(acc).T + block.out_proj.bias.to(acc)
        return total

    @torch.no_grad()
    def attention_matrix(self, batch_i: int, layer: int, head: int) -> torch.Tensor:
        """``[n, n]``: a softmax head's band (zero outside its window), a linear head's implied matrix
        (rows sum to less than 1); ``A @ v`` is what the head's op computes."""
        layer, b = self._layer(layer), self._row(batch_i)
        h = self._head(layer, head)
        offset = 0
        for mixer in self._run.layers[layer].mixers:
            H = mixer.q.shape[2]
            if h < offset + H:
                n = self._run.lengths[b]
                return self._matrix(mixer, b, n, 0, n)[h - offset]
            offset += H
        raise AssertionError("unreachable: head checked against the layer's heads")

    @torch.no_grad()
    def attention_output_per_head(self, batch_i: int, layer: int, pos: int, head: int) -> torch.Tensor:
        layer, b = self._layer(layer), self._row(batch_i)
        pos, h = self._pos(b, pos), self._head(layer, head)
        weights = self._weights(b, layer, pos, pos + 1)[0, :, h]
        return weights @ self._values(b, layer)[:, h]

    def attention_output(self, batch_i: int, layer: int, pos: int, head: Optional[int] = None) -> torch.Tensor:
        if head is not None:
            return self.attention_output_per_head(batch_i, layer, pos, head)
        layer, b = self._layer(layer), self._row(batch_i)
        return self._run.layers[layer].attn[b, self._pos(b, pos)]

    def decomposed_attn(self, batch_i: int, layer: int) -> torch.Tensor:
        """``[n, n, heads, d]`` (target, source, head): O(n²·heads·d) memory; see ``attention_contributions``
        and ``decomposed_attn_rows`` for long prompts."""
        b = self._row(batch_i)
        return self.decomposed_attn_rows(b, layer, 0, self._run.lengths[b])

    @torch.no_grad()
    def decomposed_attn_rows(self, batch_i: int, layer: int, start: int, stop: int) -> torch.Tensor:
        """Targets start..stop−1 of ``decomposed_attn`` ``[stop − start, n, heads, d]``."""
        layer, b = self._layer(layer), self._row(batch_i)
        n = self._run.lengths[b]
        if not 0 <= start < stop <= n:
            raise ValueError(f"start, stop = {start}, {stop}: need 0 <= start < stop <= {n} (row {b}'s patches)")
        return self._weights(b, layer, start, stop)[..., None] * self._values(b, layer)[None]

    @torch.no_grad()
    def attention_contributions(self, batch_i: int, layer: int, ord: float = 2.0) -> torch.Tensor:
        """``decomposed_attn(batch_i, layer).norm(ord, dim=-1)`` ``[n, n, heads]`` without forming the
        ``[n, n, heads, d]`` vectors: each is a scalar times a per-source vector, so its norm is
        |A·s| · ‖u‖. Memory O(n²·heads)."""
        layer, b = self._layer(layer), self._row(batch_i)
        n = self._run.lengths[b]
        norms = torch.linalg.vector_norm(self._values(b, layer), ord, dim=-1)
        return self._weights(b, layer, 0, n).abs_() * norms[None]
