"""The information-flow graph of one prompt (Ferrando & Voita 2024, "Information flow routes: automatically
interpreting language models at scale").

Each sum in the stream is split into its parts, and part z of a sum y gets the share
prox(z, y) / Σ prox, prox(z, y) = max(0, ‖y‖₁ − ‖y − z‖₁): a part close to the whole in L1 matters, one that
is small or points away does not. The sums are y = residual_after_attn (parts: the residual, each head's
vector from each source, the biases) and y = residual_out (parts: the stream after attention, the FFN).

Nodes (names as in the LLM Transparency Tool): ``X0_{pos}`` the embedded patch, ``A{l}_{pos}`` the stream
after layer l's attention, ``I{l}_{pos}`` layer l's FFN, ``M{l}_{pos}`` the stream after layer l. Edges
carry the shares as weights: ``prev → A`` per source (summed over heads; the residual on the diagonal),
``A → M`` the residual, ``A → I → M`` the FFN (in a parallel block the FFN reads the layer's input, so
``prev → I``). The biases' share belongs to no edge.

Everything here is plain tensors and tuples; ``to_networkx`` builds a ``networkx.DiGraph`` (the ``graph``
extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .model import AgiformerTransparentLlm

GRAPH_EXTRA = 'pip install "agiformer-kernels[graph]"'
BLOCK_BYTES = 64 << 20  # the most one block of decomposed_attn rows may take while streaming
FFN_OFFSET = 0.3  # how far right of its column a drawn FFN node sits


@dataclass
class Contributions:
    """The shares of one row's graph. Per layer l (n positions, H_l heads): ``attn[l]`` ``[n, n, H_l]``
    (target, source, head), ``attn_residual[l]``, ``attn_bias[l]``, ``ffn[l]``, ``ffn_residual[l]`` ``[n]``."""

    tokens: list[str]
    heads: list[list[str]]  # head labels per layer, in head-index order
    parallel: list[bool]  # the layer's FFN reads its input (a parallel block), not the stream after attention
    attn: list[torch.Tensor]
    attn_residual: list[torch.Tensor]
    attn_bias: list[torch.Tensor]
    ffn: list[torch.Tensor]
    ffn_residual: list[torch.Tensor]


def proximity(parts: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """max(0, ‖whole‖₁ − ‖whole − part‖₁) over the last dimension; ``whole`` broadcasts against ``parts``."""
    return (whole.abs().sum(-1) - (whole - parts).abs().sum(-1)).clamp_min(0)


def _shares(*proximities: torch.Tensor) -> list[torch.Tensor]:
    """Each proximity over the sum of all of them, per whole (the leading dimension)."""
    total = sum(p.flatten(1).sum(1) if p.dim() > 1 else p for p in proximities)
    total = total.clamp_min(torch.finfo(total.dtype).tiny)
    return [p / total.view(-1, *[1] * (p.dim() - 1)) for p in proximities]


@torch.no_grad()
def contributions(llm: AgiformerTransparentLlm, batch_i: int = 0, *, block_bytes: int = BLOCK_BYTES) -> Contributions:
    """The shares of row ``batch_i`` of ``llm``'s last run, streaming ``decomposed_attn`` by blocks of targets
    of at most ``block_bytes`` (the one [targets, n, heads, d] tensor it forms)."""
    b = llm._row(batch_i)
    n = llm.lengths()[b]
    plan = llm._plan
    out = Contributions(tokens=llm.tokens_to_strings(llm.tokens()[b, :n]),
                        heads=[[h.label for h in p["heads"]] for p in plan],
                        parallel=[p["block"] == "parallel" for p in plan],
                        attn=[], attn_residual=[], attn_bias=[], ffn=[], ffn_residual=[])
    for layer in range(len(plan)):
        acc = llm._acc()
        x = llm.residual_in(layer)[b, :n].to(acc)
        mid = llm.residual_after_attn(layer)[b, :n].to(acc)
        bias = llm.attention_bias(b, layer)
        H, d = len(plan[layer]["heads"]), x.shape[-1]
        step = max(1, block_bytes // max(1, n * H * d * torch.finfo(acc).bits // 8))
        attn, residual, const = [], [], []
        values = llm._values(b, layer)  # decomposed_attn_rows' per-source vectors, once per layer
        for start in range(0, n, step):
            stop = min(n, start + step)
            whole = mid[start:stop]
            parts = llm._weights(b, layer, start, stop)[..., None] * values[None]
            heads = proximity(parts, whole[:, None, None])
            shares = _shares(heads, proximity(x[start:stop], whole), proximity(bias[start:stop], whole))
            attn.append(shares[0])
            residual.append(shares[1])
            const.append(shares[2])
        out.attn.append(torch.cat(attn))
        out.attn_residual.append(torch.cat(residual))
        out.attn_bias.append(torch.cat(const))
        after = llm.residual_out(layer)[b, :n].to(acc)
        ffn, kept = _shares(proximity(llm.ffn_out(layer)[b, :n].to(acc), after), proximity(mid, after))
        out.ffn.append(ffn)
        out.ffn_residual.append(kept)
    return out


@torch.no_grad()
def neuron_contributions(llm: AgiformerTransparentLlm, batch_i: int, layer: int, pos: int) -> torch.Tensor:
    """``[d_ffn]``: each neuron's share of the FFN output at ``pos`` (the output bias is the one other part)."""
    parts = llm.decomposed_ffn_out(batch_i, layer, pos)
    whole = llm.ffn_out(layer)[llm._row(batch_i), pos]
    neurons, _ = _shares(proximity(parts, whole)[None], proximity(llm.ffn_bias(layer), whole)[None])
    return neurons[0]


def node(kind: str, layer: int, pos: int) -> str:
    """A node's name: kind ``X`` (embedding; layer is ignored), ``A``, ``I`` or ``M``."""
    return f"X0_{pos}" if kind == "X" else f"{kind}{layer}_{pos}"


def _prev(layer: int, pos: int) -> str:
    return node("X", 0, pos) if layer == 0 else node("M", layer - 1, pos)


def edges(c: Contributions) -> list[tuple[str, str, float, dict]]:
    """(source, target, weight, attributes) of every edge; attention edges carry their per-head shares
    (``heads``: label -> share) and, on the diagonal, the residual's (``residual``)."""
    result = []
    n = len(c.tokens)
    for layer in range(len(c.attn)):
        attn = c.attn[layer].tolist()
        labels = c.heads[layer]
        for i in range(n):
            a = node("A", layer, i)
            for j in range(i + 1):
                heads = dict(zip(labels, attn[i][j]))
                weight = sum(heads.values())
                attrs = dict(kind="attention", heads=heads)
                if j == i:
                    attrs["residual"] = float(c.attn_residual[layer][i])
                    weight += attrs["residual"]
                if weight > 0:
                    result.append((_prev(layer, j), a, weight, attrs))
            ffn, ffn_node = float(c.ffn[layer][i]), node("I", layer, i)
            source = _prev(layer, i) if c.parallel[layer] else a
            result.append((source, ffn_node, ffn, dict(kind="ffn")))
            result.append((ffn_node, node("M", layer, i), ffn, dict(kind="ffn")))
            result.append((a, node("M", layer, i), float(c.ffn_residual[layer][i]), dict(kind="residual")))
    return result


def paths_to_prediction(graph_edges: list[tuple[str, str, float, dict]], pos: int, n_layers: int,
                        threshold: float) -> list[tuple[str, str, float, dict]]:
    """The edges of weight at least ``threshold`` through which position ``pos``'s prediction (its node after
    the last layer) is reached: walked backwards from that node, as the LLM Transparency Tool does."""
    incoming: dict[str, list] = {}
    for e in graph_edges:
        if e[2] >= threshold:
            incoming.setdefault(e[1], []).append(e)
    seen, frontier, kept = set(), [node("M", n_layers - 1, pos)], []
    while frontier:
        target = frontier.pop()
        if target in seen:
            continue
        seen.add(target)
        for e in incoming.get(target, []):
            kept.append(e)
            frontier.append(e[0])
    return kept


def to_networkx(c: Contributions, threshold: float = 0.0):
    """A ``networkx.DiGraph`` of the edges of weight at least ``threshold``; each node has ``layer``,
    ``pos`` and ``kind``. Needs networkx (the ``graph`` extra)."""
    try:
        import networkx as nx
    except ImportError as e:
        raise ImportError(f"to_networkx needs networkx: {GRAPH_EXTRA}") from e
    graph = nx.DiGraph()
    for pos in range(len(c.tokens)):
        graph.add_node(node("X", 0, pos), kind="X", layer=-1, pos=pos, token=c.tokens[pos])
        for layer in range(len(c.attn)):
            for kind in "AIM":
                graph.add_node(node(kind, layer, pos), kind=kind, layer=layer, pos=pos)
    for source, target, weight, attrs in edges(c):
        if weight >= threshold:
            graph.add_edge(source, target, weight=weight, **attrs)
    return graph


def _y(kind: str, layer: int) -> float:
    return 0.0 if kind == "X" else 3 * layer + " AIM".index(kind)


def _x(kind: str, pos: int) -> float:
    return pos + FFN_OFFSET if kind == "I" else float(pos)  # the FFN beside the residual, so both show


def _xy(name: str) -> tuple[float, float]:
    head, pos = name.split("_")
    return _x(head[0], int(pos)), _y(head[0], int(head[1:]))


def draw(c: Contributions, path, *, threshold: float, highlight: Optional[int] = None, title: str = "") -> None:
    """Draw the graph to ``path`` with matplotlib: one column per patch, one row per node kind and layer;
    edges of weight at least ``threshold`` drawn with width by weight, those on the paths to position
    ``highlight``'s prediction (default: the last) in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, n_layers = len(c.tokens), len(c.attn)
    everything = edges(c)
    pos = n - 1 if highlight is None else highlight
    path_edges = {(e[0], e[1]) for e in paths_to_prediction(everything, pos, n_layers, threshold)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 2), max(4.0, 1.1 * n_layers * 3 + 1.5)))
    for source, target, weight, attrs in everything:
        if weight < threshold:
            continue
        (x0, y0), (x1, y1) = _xy(source), _xy(target)
        on_path = (source, target) in path_edges
        color = {"attention": "tab:blue", "ffn": "tab:orange", "residual": "tab:gray"}[attrs["kind"]]
        ax.plot([x0, x1], [y0, y1], color=color if on_path else "lightgray", lw=0.5 + 4 * weight,
                alpha=0.9 if on_path else 0.6, zorder=2 if on_path else 1, solid_capstyle="round")
    for layer in range(n_layers):
        for kind in "AIM":
            ax.scatter([_x(kind, i) for i in range(n)], [_y(kind, layer)] * n, s=18, color="black", zorder=3)
    ax.scatter(range(n), [0.0] * n, s=18, color="black", zorder=3)
    ax.set_xticks(range(n), [t.replace(" ", "\u2423") for t in c.tokens], rotation=45, ha="right",
                  family="monospace")
    ticks = [0.0] + [_y(k, l) for l in range(n_layers) for k in "AIM"]
    names = ["embed"] + [f"L{l} {k}" for l in range(n_layers) for k in ("attn", "ffn", "out")]
    ax.set_yticks(ticks, names)
    ax.set_xlim(-0.6, n - 0.4 + FFN_OFFSET)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = [plt.Line2D([], [], color=col, lw=2, label=lab) for col, lab in
              (("tab:blue", "attention"), ("tab:orange", "FFN"), ("tab:gray", "residual"))]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
              title=f"paths to patch {pos}'s\nprediction (≥ {threshold:g})")
    ax.set_title(title or "information flow (Ferrando & Voita shares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
