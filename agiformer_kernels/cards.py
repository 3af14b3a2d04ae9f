"""Algorithm cards: what an op or a module computes, in the pseudocode of Phuong & Hutter, "Formal Algorithms
for Transformers" (arXiv 2207.09238), as data.

A ``Card`` holds inputs and outputs (symbol, type, gloss), hyperparameters (symbol = value, read from the
function's defaults or the module instance), parameters (symbol, shape, the module attribute that holds it)
and numbered steps, each with its expression, result shape and a note. Shapes are tuples of dimension
expressions (``"B"``, ``"3*d"``, ``"N*P"``) evaluated against the card's sizes, so a test can compare every
declared shape with the one the code produces. ``render()`` gives the text, ``to_dict()`` the JSON.

``algorithm(op_name)`` is the card of a public op (docs/ops.md §1).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

Dims = tuple[Union[str, int], ...]
WIDTH = 100  # rendered cards stay readable at this width
SHAPE_COLUMN = 58  # steps' shapes start here when the expressions leave room


def dim_text(dim: Union[str, int]) -> str:
    """``"3*d"`` -> ``3d``, ``"N*P"`` -> ``N·P``, ``"d//H"`` -> ``d/H``."""
    s = str(dim).replace("//", "/")
    s = re.sub(r"(\d)\*(?=[A-Za-z(])", r"\1", s)
    return s.replace("*", "·")


def shape_text(space: str, dims: Optional[Dims]) -> str:
    if dims is None:
        return ""
    if not dims:
        return space
    return f"{space}^{{{'×'.join(dim_text(d) for d in dims)}}}"


def evaluate(dims: Dims, sizes: dict[str, int]) -> tuple[int, ...]:
    """The integer shape of ``dims`` given the sizes (``KeyError``-free: an unknown symbol raises NameError)."""
    return tuple(d if isinstance(d, int) else int(eval(d, {"__builtins__": {}}, dict(sizes))) for d in dims)


@dataclass
class Var:
    """An input or output: ``symbol ∈ space^{dims}`` — gloss."""

    symbol: str
    dims: Optional[Dims]
    gloss: str = ""
    space: str = "ℝ"

    @property
    def type(self) -> str:
        return shape_text(self.space, self.dims)


@dataclass
class Hyper:
    """A hyperparameter: ``symbol = value``; ``key`` is the config key or argument it is (for a round trip)."""

    symbol: str
    value: Any
    key: str = ""
    gloss: str = ""


@dataclass
class Param:
    """A trained parameter: ``symbol ∈ ℝ^{dims}``, held by the module attribute ``attr``."""

    symbol: str
    dims: Dims
    attr: str
    gloss: str = ""


@dataclass
class Step:
    """One line of the algorithm. ``kind``: bind (x ← e), update (x ← x + e, in place), loop (opens a
    block), end (closes it), return, comment. ``dims``: the result's shape; ``at``: the submodule (relative
    attribute path) whose output it is, so a test can observe it; ``output``: True where it is the
    algorithm's result."""

    kind: str
    expr: str
    dims: Optional[Dims] = None
    note: str = ""
    space: str = "ℝ"
    at: Optional[str] = None
    output: bool = False

    @property
    def shape(self) -> str:
        return shape_text(self.space, self.dims)


@dataclass
class Card:
    name: str
    family: str
    inputs: list[Var]
    outputs: list[Var]
    hypers: list[Hyper] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # size symbols the dims use (d, H, E, h, ...)
    children: list[tuple[str, "Card"]] = field(default_factory=list)  # (attribute, card) of submodules
    uses: list[str] = field(default_factory=list)  # op names the steps call
    config: dict = field(default_factory=dict)  # the model's component choices (architecture, ...)
    count: Optional[int] = None  # total trainable parameters of the module

    def all_params(self, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
        """(full attribute name, shape) of every parameter, own and the children's, in module order."""
        out = [(prefix + p.attr, evaluate(p.dims, self.sizes)) for p in self.params]
        for attr, child in self.children:
            out += child.all_params(f"{prefix}{attr}.")
        return out

    def param_count(self) -> int:
        total = 0
        for _, shape in self.all_params():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def render(self, width: int = WIDTH) -> str:
        lines = [f"Algorithm: {self.name}  [{self.family}]"]

        def block(label: str, items: list[str]) -> None:
            for i, item in enumerate(items):
                lines.append(_wrap(f"{label if i == 0 else '':<8}{item}", width, 8))

        io = self.inputs + self.outputs
        sw = max((len(v.symbol) for v in io), default=0)
        tw = max((len(v.type) for v in io), default=0)
        for label, vs in (("Input:", self.inputs), ("Output:", self.outputs)):
            block(label, [f"{v.symbol:<{sw}} ∈ {v.type:<{tw}}  {v.gloss}".rstrip() for v in vs])
        if self.hypers:
            hy = [f"{h.symbol} = {_value(h.value)}" + (f" ({h.gloss})" if h.gloss else "") for h in self.hypers]
            block("Hyper:", _pack(hy, width - 8))
        params = [f"{p.symbol} ∈ {shape_text('ℝ', tuple(evaluate(p.dims, self.sizes)))}  .{p.attr}"
                  for p in self.params]
        params += [f"θ_{attr} : {child.name}  ({child.param_count():,})" for attr, child in self.children
                   if child.param_count()]
        if params:
            block("Param:", _pack(params, width - 8))
        if self.params or self.children:
            lines.append(f"{'':<8}{self.param_count():,} parameters")
        if self.steps:
            lines.append("")
            lines += self._render_steps(width)
        return "\n".join(lines)

    def _render_steps(self, width: int) -> list[str]:
        rows, depth, n = [], 0, 0
        for s in self.steps:
            if s.kind == "end":
                depth -= 1
            n += s.kind != "comment"
            text = {"comment": f"▷ {s.expr}", "return": f"return {s.expr}", "end": "end"}.get(s.kind, s.expr)
            number = "" if s.kind == "comment" else f"{n:>3}"
            rows.append((number, "  " * depth + text, s.shape, s.note))
            if s.kind == "loop":
                depth += 1
        col = min(max(len(r[0]) + 2 + len(r[1]) for r in rows) + 2, SHAPE_COLUMN)
        sw = min(max(len(r[2]) for r in rows) + 2, 22)
        out = []
        for number, text, shape, note in rows:
            left = f"{number:>3}  {text}"
            if len(left) + 2 > col and (shape or note):
                out.append(left)
                left = ""
            line = f"{left:<{col}}{shape}"
            if note:
                line = f"{line:<{col + sw}}▷ {note}" if len(line) <= col + sw else f"{line}  ▷ {note}"
            out.append(_wrap(line.rstrip(), width, col + sw + 2))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        for v in d["inputs"] + d["outputs"]:
            v["type"] = shape_text(v["space"], tuple(v["dims"]) if v["dims"] is not None else None)
        for p, (_, shape) in zip(d["params"], [(p.attr, evaluate(p.dims, self.sizes)) for p in self.params]):
            p["shape"] = list(shape)
        d["param_count"] = self.param_count()
        d["children"] = [{"attr": a, "card": c.to_dict()} for a, c in self.children]
        return d


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def _pack(items: list[str], width: int) -> list[str]:
    """Items joined with ", " into lines of at most ``width`` characters."""
    lines, cur = [], ""
    for it in items:
        if cur and len(cur) + 2 + len(it) > width:
            lines.append(cur + ",")
            cur = it
        else:
            cur = f"{cur}, {it}" if cur else it
    return lines + ([cur] if cur else [])


def _wrap(line: str, width: int, indent: int) -> str:
    """``line`` broken at spaces to at most ``width`` characters, continuation lines indented by ``indent``."""
    if len(line) <= width:
        return line
    out, cur = [], line
    indent = min(indent, width - 24)
    while len(cur) > width:
        cut = cur.rfind(" ", indent + 1, width)
        if cut <= indent:
            break
        out.append(cur[:cut].rstrip())
        cur = " " * indent + cur[cut:].lstrip()
    return "\n".join(out + [cur])


# ------------------------------------------------------------------------------------------------------------
# The ops' cards (docs/ops.md §1). Hyperparameter values are the public functions' defaults.


def _defaults(fn: Callable) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _hyper(fn: Callable, *names_glosses: tuple[str, str, str]) -> list[Hyper]:
    d = _defaults(fn)
    return [Hyper(sym, d.get(key, "required"), key, gloss) for key, sym, gloss in names_glosses]


def _linear_attention() -> Card:
    from . import linear_attention

    return Card(
        "linear_attention", "causal linear attention (docs/ops.md §1.1)",
        [Var("q", ("B", "L", "H", "D"), "queries"), Var("k", ("B", "L", "H", "D"), "keys"),
         Var("v", ("B", "L", "H", "Dv"), "values")],
        [Var("o", ("B", "L", "H", "Dv"), "outputs"),
         Var("(S_L, z_L)", ("B", "H", "D", "Dv"), "final state and normaliser (output_final_state)")],
        _hyper(linear_attention, ("feature_map", "φ", "feature map"), ("feature_eps", "ε_φ", "φ = elu+1+ε_φ"),
               ("eps", "ε", "normaliser floor"), ("normalize", "normalize", "divide by q̂ᵀz"))
        + [Hyper("s", "1/√D", "scale", "query scale")],
        steps=[
            Step("bind", "q̂ ← s·(elu(q) + 1 + ε_φ)", ("B", "L", "H", "D"), "fp32 accumulation"),
            Step("bind", "k̂ ← elu(k) + 1 + ε_φ", ("B", "L", "H", "D"), "strictly positive"),
            Step("bind", "S ← 0, z ← 0", ("B", "H", "D", "Dv"), "state; z ∈ ℝ^{B×H×D}"),
            Step("loop", "for t = 1, …, L:"),
            Step("update", "S ← S + k̂_t v_tᵀ", ("B", "H", "D", "Dv"), "token t sees itself"),
            Step("update", "z ← z + k̂_t", ("B", "H", "D")),
            Step("bind", "o_t ← q̂_tᵀS / (q̂_tᵀz + ε)", ("B", "H", "Dv"), "without normalize: q̂_tᵀS"),
            Step("end", ""),
            Step("return", "o", ("B", "L", "H", "Dv"), "kernels: chunks of 64, one state per chunk",
                 output=True),
        ])


def _linear_attention_step() -> Card:
    from . import linear_attention_step

    return Card(
        "linear_attention_step", "one token of causal linear attention (docs/ops.md §1.1)",
        [Var("q, k", ("B", "H", "D"), "one token"), Var("v", ("B", "H", "Dv")),
         Var("(S, z)", ("B", "H", "D", "Dv"), "state, z ∈ ℝ^{B×H×D}; updated in place")],
        [Var("o", ("B", "H", "Dv"))],
        _hyper(linear_attention_step, ("feature_eps", "ε_φ", "φ = elu+1+ε_φ"), ("eps", "ε", "normaliser floor"))
        + [Hyper("s", "1/√D", "scale", "query scale")],
        steps=[
            Step("bind", "q̂ ← s·φ(q),  k̂ ← φ(k)", ("B", "H", "D")),
            Step("update", "S ← S + k̂vᵀ", ("B", "H", "D", "Dv"), "in place"),
            Step("update", "z ← z + k̂", ("B", "H", "D"), "in place"),
            Step("return", "q̂ᵀS / (q̂ᵀz + ε)", ("B", "H", "Dv"), output=True),
        ])


def _sliding_window_attention() -> Card:
    return Card(
        "sliding_window_attention", "causal sliding-window attention (docs/ops.md §1.2)",
        [Var("q, k", ("B", "L", "H", "D")), Var("v", ("B", "L", "H", "Dv"))],
        [Var("o", ("B", "L", "H", "Dv"))],
        [Hyper("w", "window", "window", "keys per query, itself included"),
         Hyper("s", "1/√D", "scale", "score scale")],
        steps=[
            Step("loop", "for i = 1, …, L:"),
            Step("comment", "window rule: keys j with i − w < j ≤ i (FlashAttention window (w−1, 0))"),
            Step("bind", "a_j ← s·q_iᵀk_j  for max(1, i−w+1) ≤ j ≤ i", ("B", "H", "min(L,w)"), "≤ w scores"),
            Step("bind", "o_i ← Σ_j softmax_j(a)·v_j", ("B", "H", "Dv")),
            Step("end", ""),
            Step("return", "o", ("B", "L", "H", "Dv"), "O(L·w): no L×L matrix", output=True),
        ])


def _sliding_window_attention_step() -> Card:
    return Card(
        "sliding_window_attention_step", "one token of sliding-window attention (docs/ops.md §1.2)",
        [Var("q, k", ("B", "H", "D")), Var("v", ("B", "H", "Dv")),
         Var("K, V", ("B", "W", "H", "D"), "ring buffers of the last W keys / values; in place"),
         Var("pos", (), "the token's position", "ℕ")],
        [Var("o", ("B", "H", "Dv"))],
        [Hyper("W", "k_cache.shape[1]", "window", "the ring's slots"), Hyper("s", "1/√D", "scale")],
        steps=[
            Step("update", "K[pos mod W] ← k,  V[pos mod W] ← v", ("B", "H", "D"), "in place"),
            Step("bind", "a_j ← s·qᵀK_j  for the min(pos+1, W) filled slots", ("B", "H", "min(pos+1,W)")),
            Step("return", "Σ_j softmax_j(a)·V_j", ("B", "H", "Dv"), "= sliding_window_attention at pos",
                 output=True),
        ])


_GRU_STEPS = [
    Step("comment", "byte-table factorisation: W_ih·[E[b] | c] = T[b] + W_ih[:, h:]·c"),
    Step("bind", "T ← E·W_ih[:, :h]ᵀ", (256, "3*h"), "once per weights (gru_patch_byte_table)"),
    Step("bind", "g ← W_ih[:, h:]·c + b_ih", ("M", "3*h"), "one context product per patch"),
    Step("bind", "h_0 ← 0", ("M", "h")),
]
_GRU_CELL = [
    Step("bind", "[x_r, x_z, x_n] ← T[b_t] + g", ("M", "3*h"), "gather, no [2h] product"),
    Step("bind", "[y_r, y_z, y_n] ← W_hh·h_t + b_hh", ("M", "3*h"), "skipped at t = 0 (h_0 = 0)"),
    Step("bind", "r ← σ(x_r + y_r),  u ← σ(x_z + y_z)", ("M", "h")),
    Step("bind", "n ← tanh(x_n + r ⊙ y_n)", ("M", "h")),
    Step("bind", "h_{t+1} ← (1 − u) ⊙ n + u ⊙ h_t", ("M", "h"), "nn.GRU's cell"),
]
_GRU_PARAMS = [Var("E", (256, "h"), "byte_emb"), Var("W_ih", ("3*h", "2*h"), "r, z, n blocks"),
               Var("W_hh", ("3*h", "h")), Var("b_ih, b_hh", ("3*h",))]
_HEAD_PARAMS = [Var("W_o", (256, "h"), "head_weight"), Var("b_o", (256,), "head_bias")]


def _gru_patch_decode() -> Card:
    return Card(
        "gru_patch_decode", "teacher-forced GRU patch decoder (docs/ops.md §1.3)",
        [Var("c", ("M", "h"), "context per patch"), Var("b", ("M", "P"), "previous bytes", "{0..255}"),
         *_GRU_PARAMS],
        [Var("H", ("M", "P", "h"), "hidden states h_1 … h_P")],
        steps=[*_GRU_STEPS, Step("loop", "for t = 0, …, P − 1:"), *_GRU_CELL, Step("end", ""),
               Step("return", "[h_1, …, h_P]", ("M", "P", "h"), output=True)])


def _gru_patch_loss() -> Card:
    from . import gru_patch_loss

    return Card(
        "gru_patch_loss", "fused GRU decoder + cross-entropy (docs/ops.md §1.3)",
        [Var("c", ("M", "h"), "context per patch"), Var("y", ("M", "P"), "target bytes", "{0..255}"),
         *_GRU_PARAMS, *_HEAD_PARAMS],
        [Var("ℓ", (), "nats (reduction mean / sum; none: ℝ^{M×P})")],
        _hyper(gru_patch_loss, ("sos", "sos", "first input byte"), ("reduction", "reduction", "")),
        steps=[*_GRU_STEPS, Step("loop", "for t = 0, …, P − 1:"),
               Step("bind", "b_t ← sos if t = 0 else y_{t−1}", ("M",), "teacher forcing", "{0..255}"),
               *_GRU_CELL,
               Step("bind", "λ ← W_o·h_{t+1} + b_o", ("M", 256), "per tile, never stored"),
               Step("bind", "ℓ_t ← logsumexp(λ) − λ[y_t]", ("M",)),
               Step("end", ""),
               Step("return", "mean_{m,t} ℓ_t", (), output=True)])


def _gru_patch_sample() -> Card:
    from . import gru_patch_sample

    return Card(
        "gru_patch_sample", "free-running GRU decoder with sampling (docs/ops.md §1.3)",
        [Var("c", ("M", "h"), "context per patch"), *_GRU_PARAMS, *_HEAD_PARAMS,
         Var("prefix", ("M", "r"), "forced first bytes, r < P (optional)", "{0..255}")],
        [Var("y", ("M", "P"), "sampled bytes", "{0..255}")],
        _hyper(gru_patch_sample, ("temperature", "τ", "0: argmax"), ("top_k", "k", "None: all 256"),
               ("sos", "sos", "first input byte")),
        steps=[*_GRU_STEPS, Step("bind", "b_0 ← sos", ("M",), space="{0..255}"),
               Step("loop", "for t = 0, …, P − 1:"), *_GRU_CELL,
               Step("bind", "λ ← W_o·h_{t+1} + b_o", ("M", 256)),
               Step("bind", "u ← lowbias32(seed, m, t) / 2³²", ("M",), "counter-based uniform"),
               Step("bind", "y_t ← prefix_t if t < r else argmax λ if τ = 0", ("M",), space="{0..255}"),
               Step("comment", "else the first j with cumsum_j e > u·Σe, e = exp((λ − max λ)/τ) on the top k"),
               Step("bind", "b_{t+1} ← y_t", ("M",), "fed back", "{0..255}"),
               Step("end", ""),
               Step("return", "y", ("M", "P"), space="{0..255}", output=True)])


def _gru_patch_byte_table() -> Card:
    return Card(
        "gru_patch_byte_table", "the GRU's byte table (docs/ops.md §1.3)",
        [Var("E", (256, "h"), "byte_emb"), Var("W_ih", ("3*h", "2*h"))],
        [Var("T", (256, "3*h"), "fp32, no gradient")],
        steps=[Step("return", "E·W_ih[:, :h]ᵀ", (256, "3*h"), "row b: the byte part of W_ih·x", output=True)])


def _entropy_segments() -> Card:
    from . import entropy_segments

    return Card(
        "entropy_segments", "entropy segmentation (docs/ops.md §1.4)",
        [Var("λ", ("B", "L", "V"), "next-byte logits")],
        [Var("H", ("B", "L"), "entropy (nats)"), Var("starts", ("B", "L"), "segment starts", "{0,1}")],
        _hyper(entropy_segments, ("threshold", "θ", ""), ("delta", "δ", "required by delta"),
               ("max_len", "m", "longest segment")),
        steps=[Step("bind", "H_t ← −Σ_v p_v log p_v,  p = softmax(λ_t)", ("B", "L"), "tile by tile"),
               Step("comment", "delta:  start_t ← t = 0 ∨ H_t > H_{t−1} + δ ∨ H_t > θ"),
               Step("comment", "global: start_j ← j ≤ 1 ∨ H_{j−1} > θ"),
               Step("bind", "starts ← rule(H); cut every segment after m positions", ("B", "L"), space="{0,1}"),
               Step("return", "(H, starts)", ("B", "L"), output=True)])


def _segment_offsets() -> Card:
    return Card(
        "segment_offsets", "segment offsets of a start mask (docs/ops.md §1.4)",
        [Var("starts", ("B", "L"), "", "{0,1}")], [Var("offsets", ("S+1",), "cu_seqlens", "ℕ")],
        steps=[Step("bind", "starts[:, 0] ← 1", ("B", "L"), "segments never cross rows", "{0,1}"),
               Step("return", "[nonzero(flatten(starts)), B·L]", ("S+1",), "data-dependent S", "ℕ",
                    output=True)])


def _segment_pool() -> Card:
    return Card(
        "segment_pool", "segment pooling by learned queries (docs/ops.md §1.5)",
        [Var("Q", ("Nq", "H", "D"), "queries"), Var("k", ("T", "H", "D")), Var("v", ("T", "H", "Dv")),
         Var("offsets", ("S+1",), "strictly increasing, 0 … T", "ℕ")],
        [Var("out", ("S", "Nq", "H", "Dv"))],
        [Hyper("s", "1/√D", "scale")],
        steps=[Step("loop", "for s = 1, …, S:"),
               Step("bind", "a_t ← s·Q·k_t  for offsets[s] ≤ t < offsets[s+1]", ("Nq", "H", "T_s")),
               Step("bind", "out[s] ← Σ_t softmax_t(a)·v_t", ("Nq", "H", "Dv")),
               Step("end", ""),
               Step("return", "out", ("S", "Nq", "H", "Dv"), "no [S·Q, T] mask", output=True)])


def _vq_nearest() -> Card:
    return Card(
        "vq_nearest", "nearest-code quantisation (docs/ops.md §1.6)",
        [Var("z", ("N", "D")), Var("C", ("K", "D"), "codebook")],
        [Var("i", ("N",), "code index", "ℕ"), Var("δ", ("N",), "squared distance")],
        steps=[Step("bind", "i_n ← argmin_k ‖z_n − C_k‖²", ("N",), "ties: lowest k; tiles, no [N, K]", "ℕ"),
               Step("bind", "δ_n ← Σ_d (z_n − C_{i_n})²", ("N",), "recomputed, no cancellation"),
               Step("return", "(i, δ)", ("N",), output=True)])


def _vq_ema_update() -> Card:
    from . import vq_ema_update

    return Card(
        "vq_ema_update", "EMA codebook update (docs/ops.md §1.6)",
        [Var("z", ("N", "D")), Var("i", ("N",), "", "ℕ"), Var("c", ("K",), "counts, in place"),
         Var("Σ", ("K", "D"), "sums, in place")],
        [Var("C", ("K", "D"), "codebook")],
        [Hyper("γ", "decay", "decay", "required"), *_hyper(vq_ema_update, ("eps", "ε", "Laplace smoothing"))],
        steps=[Step("update", "c_k ← γ·c_k + (1 − γ)·|{n : i_n = k}|", ("K",), "in place"),
               Step("update", "Σ_k ← γ·Σ_k + (1 − γ)·Σ_{n : i_n = k} z_n", ("K", "D"), "in place"),
               Step("bind", "n ← Σ_k c_k", ()),
               Step("return", "Σ_k / ((c_k + ε)/(n + K·ε)·n)", ("K", "D"), output=True)])


OP_CARDS: dict[str, Callable[[], Card]] = {
    "entropy_segments": _entropy_segments,
    "gru_patch_byte_table": _gru_patch_byte_table,
    "gru_patch_decode": _gru_patch_decode,
    "gru_patch_loss": _gru_patch_loss,
    "gru_patch_sample": _gru_patch_sample,
    "linear_attention": _linear_attention,
    "linear_attention_step": _linear_attention_step,
    "segment_offsets": _segment_offsets,
    "segment_pool": _segment_pool,
    "sliding_window_attention": _sliding_window_attention,
    "sliding_window_attention_step": _sliding_window_attention_step,
    "vq_ema_update": _vq_ema_update,
    "vq_nearest": _vq_nearest,
}


def algorithm(op_name: str) -> Card:
    """The card of public op ``op_name``; ``ValueError`` naming the ops for an unknown one."""
    if op_name not in OP_CARDS:
        raise ValueError(f"no op {op_name!r}; the ops: {', '.join(OP_CARDS)}")
    return OP_CARDS[op_name]()
