"""HierarchicalAutoencoder: bytes compressed level by level into discrete codes by entropy-cut segments,
reconstructed by expanders, with an optional language model over the top level's codes.

Level i compresses its tokens (bytes for level 1, the level below's code indices above it) with a
``SegmentCompressor`` and a ``VectorQuantizer`` into one code per segment; ``CodeExpander`` i reconstructs
those tokens from the codes. ``CodeLM`` models the top level's codes.

**When a segment is known to be complete.** A segment's code summarises all its tokens, so a model of
token t may read it only once the segment has ended *and* that is decided by tokens < t. The compressor is
causal, so the cut before position j is decided by:

- rule ``"global"``: H_{j−1} (and the ``max_len`` count), i.e. tokens <= j − 1. A segment ending at e is
  known complete from position e + 1 on.
- rule ``"delta"``: H_j against H_{j−1}, i.e. tokens <= j. A segment ending at e is known complete from
  position e + 2 on.

``nll`` is the level-1 expander in its causal mode, which reads only codes of segments known complete in
that sense: a true causal likelihood, −log p(x_t | x_<t) for every t. Byte 0 is predicted from the BOS
input alone (no code is visible), so ``nll.sum()`` is the code length of the whole row.

Training (``forward`` in training mode) does all bookkeeping itself: each quantiser's EMA step, its ring
buffer of recent encoder outputs and its dead-code resets, and the segmenters' adaptive thresholds; all
of it is in registered buffers, so a trainer needs no hook after the optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .components import (CAUSAL, RECON, CodeExpander, CodeLM, Quantised, SegmentCompressor, Segments,
                         VectorQuantizer, masked_cross_entropy, scatter_segments)
from .config import validate

STAGES = ("base", "top")


@dataclass
class Output:
    """``loss``: the weighted sum of the stage's ``losses`` (unweighted scalars); ``metrics``: plain floats."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass
class EncodedLevel:
    """One level's encoding of a batch: its tokens ``ids [B, L]`` and ``lengths [B]``, the compressor's
    next-token ``logits``, the segmentation, the quantiser's result and the codes laid out per row:
    ``codes [B, S, code_dim]`` (straight-through vectors) and ``index [B, S]`` (0 past each row's count)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    logits: torch.Tensor
    seg: Segments
    quant: Quantised
    codes: torch.Tensor
    index: torch.Tensor


class HierarchicalAutoencoder(nn.Module):
    """The hierarchical byte autoencoder of ``config`` (``agiformer.hierarchical.config``; ``model.config`` is
    the complete config). ``backend`` goes to every op call.

    Stages (``set_stage``): ``"base"`` trains the compressors and expanders (with their entropy LMs); the top
    LM is frozen and unused. ``"top"`` freezes the base (``requires_grad`` False, kept in eval mode, so no
    EMA or threshold updates) and trains the top LM on its codes.
    """

    def __init__(self, config: Optional[dict] = None, *, backend: Optional[str] = None):
        super().__init__()
        self.config = validate(config)
        cfg = self.config
        self.backend = backend
        compressors, quantizers, expanders = [], [], []
        vocab = 256
        for i, level in enumerate(cfg["levels"]):
            where = f"levels[{i}]"
            compressors.append(SegmentCompressor(vocab, level, cfg["ngram"], backend=backend, path=where))
            quantizers.append(VectorQuantizer(level["codebook_size"], level["code_dim"], level["vq"],
                                              backend=backend))
            expanders.append(CodeExpander(vocab, level, cfg["ngram"], backend=backend, path=where))
            vocab = level["codebook_size"]
        self.compressors = nn.ModuleList(compressors)
        self.quantizers = nn.ModuleList(quantizers)
        self.expanders = nn.ModuleList(expanders)
        self.top_lm = CodeLM(vocab, cfg["top_lm"], cfg["ngram"], backend=backend) if cfg["top_lm"] else None
        self.stage = "base"
        self.set_stage("base")

    @property
    def num_levels(self) -> int:
        return len(self.compressors)

    def _base(self) -> list[nn.Module]:
        return [self.compressors, self.quantizers, self.expanders]

    def set_stage(self, stage: str) -> "HierarchicalAutoencoder":
        """``"base"`` or ``"top"`` (see the class docstring); ``ValueError`` for another name or ``"top"``
        without a top LM."""
        if stage not in STAGES:
            raise ValueError(f"stage = {stage!r}: one of {', '.join(STAGES)}")
        if stage == "top" and self.top_lm is None:
            raise ValueError("stage = 'top': this config has no top_lm")
        self.stage = stage
        for part in self._base():
            part.requires_grad_(stage == "base")
        if self.top_lm is not None:
            self.top_lm.requires_grad_(stage == "top")
        return self.train(self.training)

    def train(self, mode: bool = True) -> "HierarchicalAutoencoder":
        super().train(mode)
        if self.stage == "top":
            for part in self._base():
                part.eval()
        return self

    # ------------------------------------------------------------------ inputs and encoding

    def _inputs(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor of bytes [B, L], got {type(x).__name__}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"x must hold integer bytes (uint8 or int64), got {x.dtype}")
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must have shape [B, L] with B, L >= 1, got {tuple(x.shape)}")
        device = self.expanders[0].head.weight.device
        ids = x.to(device=device, dtype=torch.long)
        if x.dtype != torch.uint8 and (int(ids.min()) < 0 or int(ids.max()) > 255):
            raise ValueError(f"x must hold bytes 0..255, got values in {int(ids.min())}..{int(ids.max())}")
        B, L = ids.shape
        if lengths is None:
            return ids, torch.full((B,), L, dtype=torch.long, device=device)
        if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor [B], got {type(lengths).__name__}"
                            f"{'' if not isinstance(lengths, torch.Tensor) else ' of ' + str(lengths.dtype)}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape [B] = [{B}], got {tuple(lengths.shape)}")
        lengths = lengths.to(device=device, dtype=torch.long)
        if int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise ValueError(f"lengths must lie in 1..L = 1..{L}, got {lengths.tolist()}")
        return ids, lengths

    def _encode(self, i: int, ids: torch.Tensor, lengths: torch.Tensor, update: bool) -> EncodedLevel:
        comp, vq = self.compressors[i], self.quantizers[i]
        h, logits = comp.hidden(ids)
        seg = comp.cut(logits, lengths, adapt=update)
        quant = vq(comp.pool(h, seg), update=update)
        return EncodedLevel(ids, lengths, logits, seg, quant, scatter_segments(quant.quantized, seg),
                            scatter_segments(quant.index, seg))

    def _encode_all(self, ids: torch.Tensor, lengths: torch.Tensor, update: bool) -> list[EncodedLevel]:
        levels = []
        for i in range(self.num_levels):
            level = self._encode(i, ids, lengths, update)
            levels.append(level)
            ids, lengths = level.index, level.seg.count
        return levels

    def _known_latest(self, i: int, seg: Segments, L: int) -> torch.Tensor:
        """``[B, L]``: the newest segment of level i known complete from tokens < t (−1: none); see the module
        docstring."""
        lag = 2 if self.compressors[i].segmenter["rule"] == "delta" else 1
        ready = (seg.end + lag).contiguous()  # padding entries: L + lag, after every position
        t = torch.arange(L, device=ready.device).expand(ready.shape[0], L).contiguous()
        return torch.searchsorted(ready, t, right=True) - 1

    def _causal_logits(self, level: EncodedLevel, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        exp = self.expanders[0]
        h = exp.trunk(level.ids) if h is None else h
        latest = self._known_latest(0, level.seg, level.ids.shape[1])
        return exp.logits(h, level.codes, level.seg.start, latest, CAUSAL)

    # ------------------------------------------------------------------ training

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> Output:
        """Bytes ``x [B, L]`` (uint8 or int64; ``lengths [B]`` for rows padded at the end) -> ``Output``.

        Stage ``"base"``: losses ``reconstruction`` (expanders, mean over levels), ``commitment`` and
        ``codebook`` (quantisers, mean over levels; codebook 0 with EMA), ``entropy_lm`` (compressors' next-token
        cross-entropy, mean over levels) and ``causal_lm`` (``nll``'s mean per byte). Stage ``"top"``:
        ``top_lm`` (next top code cross-entropy). Metrics per level ``l{i}/``: ``recon_acc``,
        ``bytes_per_code``, ``perplexity``, ``dead_codes``, ``threshold``, ``entropy_lm``; ``l1/causal_bpb``;
        ``top_lm/acc`` and ``top_lm/bits_per_code`` in stage ``"top"``."""
        ids, lengths = self._inputs(x, lengths)
        if self.stage == "top":
            return self._forward_top(ids, lengths)
        levels = self._encode_all(ids, lengths, update=self.training)
        parts: dict[str, list[torch.Tensor]] = {"reconstruction": [], "commitment": [], "codebook": [],
                                                "entropy_lm": []}
        metrics: dict[str, float] = {}
        total_bytes = float(lengths.sum())
        for i, level in enumerate(levels):
            name = f"l{i + 1}"
            L = level.ids.shape[1]
            mask = torch.arange(L, device=ids.device) < level.lengths[:, None]
            n = mask.sum()
            next_mask = mask[:, 1:]
            entropy_lm = masked_cross_entropy(level.logits[:, :-1], level.ids[:, 1:], next_mask).sum() \
                / next_mask.sum().clamp_min(1)
            exp = self.expanders[i]
            h = exp.trunk(level.ids)
            logits = exp.logits(h, level.codes, level.seg.start, level.seg.seg_id, RECON)
            parts["reconstruction"].append(masked_cross_entropy(logits, level.ids, mask).sum() / n)
            parts["commitment"].append(level.quant.commitment)
            parts["codebook"].append(level.quant.codebook_loss)
            parts["entropy_lm"].append(entropy_lm)
            if i == 0:
                causal = masked_cross_entropy(self._causal_logits(level, h), ids, mask).sum() / n
                metrics["l1/causal_bpb"] = float(causal.detach()) / math.log(2)
            vq = self.quantizers[i]
            metrics.update({
                f"{name}/recon_acc": float(((logits.argmax(-1) == level.ids) & mask).sum() / n),
                f"{name}/bytes_per_code": total_bytes / float(level.seg.count.sum()),
                f"{name}/perplexity": float(level.quant.perplexity),
                f"{name}/dead_codes": float(vq.dead().sum()),
                f"{name}/threshold": float(self.compressors[i].threshold),
                f"{name}/entropy_lm": float(entropy_lm.detach()),
            })
        losses = {k: torch.stack(v).mean() for k, v in parts.items()}
        losses["causal_lm"] = causal
        return self._output(losses, metrics)

    def _forward_top(self, ids: torch.Tensor, lengths: torch.Tensor) -> Output:
        with torch.no_grad():
            levels = self._encode_all(ids, lengths, update=False)
        top = levels[-1]
        codes, count = top.index, top.seg.count
        mask = torch.arange(codes.shape[1], device=ids.device) < count[:, None]
        logits = self.top_lm(codes)
        top_lm = masked_cross_entropy(logits, codes, mask).sum() / mask.sum()
        metrics = {f"l{i + 1}/bytes_per_code": float(lengths.sum()) / float(lv.seg.count.sum())
                   for i, lv in enumerate(levels)}
        metrics["top_lm/acc"] = float(((logits.argmax(-1) == codes) & mask).sum() / mask.sum())
        metrics["top_lm/bits_per_code"] = float(top_lm.detach()) / math.log(2)
        return self._output({"top_lm": top_lm}, metrics)

    def _output(self, losses: dict[str, torch.Tensor], metrics: dict[str, float]) -> Output:
        weights = self.config["loss_weights"]
        loss = sum(weights[k] * v for k, v in losses.items())
        return Output(loss, losses, metrics)

    # ------------------------------------------------------------------ evaluation

    def nll(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """−log p(x_t | x_<t) in nats, ``[B, L]`` fp32 (0 past each row's length): the level-1 expander reading
        only codes of segments known complete from bytes < t (module docstring); byte 0 is predicted from BOS.
        Bits per byte = ``nll.sum() / (number of bytes · ln 2)``. Changes no state."""
        ids, lengths = self._inputs(x, lengths)
        level = self._encode(0, ids, lengths, update=False)
        mask = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
        return masked_cross_entropy(self._causal_logits(level), ids, mask)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                    teacher_forcing: bool = False) -> torch.Tensor:
        """The bytes ``[B, L]`` uint8 (0 past each row's length) decoded from the top level's codes and every
        level's segment lengths: each expander runs free (greedy, fed its own outputs), top level first, the
        codes it decodes feeding the level below; L passes of each expander. ``teacher_forcing``: the level-1
        expander's greedy byte at each position given the true bytes before it (what ``l1/recon_acc``
        scores), one pass."""
        ids, lengths = self._inputs(x, lengths)
        levels = self._encode_all(ids, lengths, update=False)
        if teacher_forcing:
            lv, exp = levels[0], self.expanders[0]
            out = exp.logits(exp.trunk(ids), lv.codes, lv.seg.start, lv.seg.seg_id, RECON).argmax(-1)
        else:
            index = levels[-1].index
            for i in reversed(range(self.num_levels)):
                index = self._decode(i, self.quantizers[i].codebook[index], levels[i])
            out = index
        mask = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
        return (out * mask).to(torch.uint8)

    def _decode(self, i: int, codes: torch.Tensor, level: EncodedLevel) -> torch.Tensor:
        exp = self.expanders[i]
        B, L = level.ids.shape
        tokens = torch.zeros(B, L, dtype=torch.long, device=codes.device)
        for t in range(L):
            logits = exp.logits(exp.trunk(tokens[:, : t + 1]), codes, level.seg.start, level.seg.seg_id[:, : t + 1],
                                RECON)
            tokens[:, t] = logits[:, t].argmax(-1)
        return tokens

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_bytes(self, prompt: bytes, max_new_bytes: int, temperature: float = 0.0, *,
                       generator: Optional[torch.Generator] = None) -> bytes:
        """The ``max_new_bytes`` bytes that follow ``prompt`` (at least 1 byte). ``temperature`` 0 is greedy;
        above 0 bytes and codes are sampled (``generator`` makes it reproducible).

        With a top LM, hierarchically: when byte t opens a segment at level 1 (decided from bytes < t, or
        assumed not opened under rule ``"delta"``, which decides it only after byte t), the codes of the
        complete segments are encoded from the bytes, the new segment's code is predicted by the level above
        (the top LM at the top, an expander below it, the same way recursively) and kept while that segment
        lasts, and the level-1 expander decodes byte t from it. Without a top LM: from ``nll``'s causal model.
        Each byte reruns the levels over the whole context (the tiny configs take milliseconds a byte)."""
        if not isinstance(prompt, (bytes, bytearray)):
            raise TypeError(f"prompt must be bytes, got {type(prompt).__name__}")
        if len(prompt) < 1:
            raise ValueError("prompt must hold at least 1 byte")
        if isinstance(max_new_bytes, bool) or not isinstance(max_new_bytes, int) or max_new_bytes < 0:
            raise ValueError(f"max_new_bytes = {max_new_bytes!r}: must be an integer >= 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature = {temperature!r}: must be a number >= 0")
        was_training = self.training
        self.eval()
        try:
            seq, cache = list(prompt), {}
            for _ in range(max_new_bytes):
                if self.top_lm is None:
                    logits = self._next_causal(seq)
                else:
                    logits = self._next_token(0, seq, cache, temperature, generator)
                seq.append(_sample(logits, temperature, generator))
        finally:
            self.train(was_training)
        return bytes(seq[len(prompt):])

    def _with_placeholder(self, prefix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.expanders[0].head.weight.device
        ids = torch.tensor([prefix + [0]], dtype=torch.long, device=device)
        return ids, torch.tensor([len(prefix) + 1], device=device)

    def _next_causal(self, seq: list[int]) -> torch.Tensor:
        ids, lengths = self._with_placeholder(seq)
        return self._causal_logits(self._encode(0, ids, lengths, update=False))[0, -1]

    def _next_token(self, i: int, prefix: list[int], cache: dict, temperature: float,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
        """Logits of the token at position t = len(prefix) of level i (bytes: 0; level i's tokens are the codes
        of level i − 1), given the complete ``prefix``."""
        if i == self.num_levels:
            codes = torch.tensor([prefix + [0]], dtype=torch.long, device=self.top_lm.head.weight.device)
            return self.top_lm(codes)[0, -1]
        comp, vq, exp = self.compressors[i], self.quantizers[i], self.expanders[i]
        ids, lengths = self._with_placeholder(prefix)
        t = len(prefix)
        h, logits = comp.hidden(ids)
        # Position t holds a placeholder: a zero-entropy prediction there cuts under neither rule (delta and
        # threshold are >= 0), so the cut before t reads tokens < t only.
        logits[:, t] = float("-inf")
        logits[:, t, 0] = 0.0
        seg = comp.cut(logits, lengths)
        m = int(seg.seg_id[0, t])  # t's segment; segments < m are complete
        index = vq(comp.pool(h, seg)).index[:m] if m else ids.new_zeros(0)
        key = (i + 1, m)
        if key not in cache:
            for old in [k for k in cache if k[0] == i + 1]:
                del cache[old]
            cache[key] = _sample(self._next_token(i + 1, index.tolist(), cache, temperature, generator),
                                 temperature, generator)
        index = torch.cat([index, index.new_tensor([cache[key]])])
        out = exp.logits(exp.trunk(ids), vq.codebook[index][None], seg.start[:, : m + 1], seg.seg_id, RECON)
        return out[0, t]


def _sample(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def num_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())

