"""Algorithm cards of the model and its components (``agiformer_kernels.cards`` has the IR and the ops' cards).

Every registered component and ``AGIFORMER`` inherit ``Carded``: ``module.algorithm()`` is the structured
card (hyperparameters read from the instance), ``algorithm_card()`` its text, ``algorithm_card_full()`` the
text of the module's card followed by each distinct sub-component's card (one block for a uniform stack)
and the cards of the ops they call, ``param_count()`` the trainable parameters. A card's steps name the
submodule whose output they are (``Step.at``), so tests compare declared and observed shapes.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from agiformer_kernels.cards import Card, Hyper, Param, Step, Var, algorithm as op_algorithm

X = ("B", "N", "d")  # a sequence of patch vectors


class Carded:
    """Mixin: the algorithm card of a module (its class's builder in ``BUILDERS``, found along the MRO)."""

    def algorithm(self) -> Card:
        return card_of(self)

    def algorithm_card(self) -> str:
        return self.algorithm().render()

    def algorithm_card_full(self) -> str:
        return render_full(self.algorithm())

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


BUILDERS: dict[str, Callable[[nn.Module], Card]] = {}


def builds(*class_names: str):
    def add(fn):
        for n in class_names:
            BUILDERS[n] = fn
        return fn

    return add


def card_of(module: nn.Module) -> Card:
    for cls in type(module).__mro__:
        if cls.__name__ in BUILDERS:
            card = BUILDERS[cls.__name__](module)
            card.count = sum(p.numel() for p in module.parameters() if p.requires_grad)
            return card
    raise TypeError(f"no algorithm card for {type(module).__qualname__}")


def render_full(card: Card) -> str:
    """The card, then each distinct sub-card (depth first, once each), then the cards of the ops used."""
    parts, seen, ops = [card.render()], {card.render()}, list(card.uses)

    def walk(c: Card) -> None:
        for _, child in c.children:
            text = child.render()
            if text not in seen:
                seen.add(text)
                parts.append(text)
                ops.extend(o for o in child.uses if o not in ops)
            walk(child)

    walk(card)
    parts += [op_algorithm(o).render() for o in dict.fromkeys(ops)]
    return ("\n\n" + "─" * 100 + "\n\n").join(parts) + "\n"


def _linear(sym: str, attr: str, dims_out, dims_in, bias: bool = True) -> list[Param]:
    ps = [Param(f"W_{sym}", (dims_out, dims_in), f"{attr}.weight")]
    return ps + [Param(f"b_{sym}", (dims_out,), f"{attr}.bias")] if bias else ps


# --- norms --------------------------------------------------------------------------------------------------

@builds("LayerNorm", "RMSNorm")
def _norm(m: nn.Module) -> Card:
    rms = isinstance(m, nn.RMSNorm)
    d = m.normalized_shape[-1]
    params = [Param("γ", ("d",), "weight")] if m.weight is not None else []
    if not rms and m.bias is not None:
        params.append(Param("β", ("d",), "bias"))
    eps = m.eps if m.eps is not None else "finfo.eps"
    step = ("x / √(mean(x²) + ε) ⊙ γ" if rms else "(x − mean(x)) / √(var(x) + ε) ⊙ γ + β")
    return Card("RMSNorm" if rms else "LayerNorm", "norm", [Var("x", ("…", "d"))], [Var("y", ("…", "d"))],
                [Hyper("d", d, "d_model"), Hyper("ε", eps, "eps")], params,
                [Step("return", step, ("…", "d"), "over the last axis", at="", output=True)], sizes={"d": d})


# --- MLPs ---------------------------------------------------------------------------------------------------

@builds("MLP")
def _mlp(m: nn.Module) -> Card:
    up, _, down, drop = m
    d, F = up.in_features, up.out_features
    return Card("MLP", "mlp (exact GELU, gelu_mlp)", [Var("x", X)], [Var("y", X)],
                [Hyper("d", d, "d_model"), Hyper("F", F, "n_inner"), Hyper("p", drop.p, "dropout")],
                _linear("1", "0", "F", "d") + _linear("2", "2", "d", "F"),
                [Step("bind", "a ← W_1 x + b_1", ("B", "N", "F"), "kept for backward"),
                 Step("bind", "g ← GELU(a)", ("B", "N", "F"), "recomputed in backward"),
                 Step("return", "dropout_p(W_2 g + b_2)", X, at="", output=True)],
                sizes={"d": d, "F": F})


@builds("GLU")
def _glu(m: nn.Module) -> Card:
    d, F = m.fc1.in_features, m.fc2.in_features
    return Card("GLU", f"mlp (gated, {m.act_fn})", [Var("x", X)], [Var("y", X)],
                [Hyper("d", d, "d_model"), Hyper("F", F, "n_inner"), Hyper("act", m.act_fn, "act_fn"),
                 Hyper("p", m.dropout.p, "dropout")],
                _linear("1", "fc1", "2*F", "d") + _linear("2", "fc2", "d", "F"),
                [Step("bind", "[a | b] ← W_1 x + b_1", ("B", "N", "2*F"), "one product, both halves", at="fc1"),
                 Step("bind", "g ← act(a) ⊙ b", ("B", "N", "F")),
                 Step("return", "dropout_p(W_2 g + b_2)", X, at="", output=True)],
                sizes={"d": d, "F": F})


# --- mixers -------------------------------------------------------------------------------------------------

def _heads(m: nn.Module) -> tuple[int, int, int]:
    return m.qkv.in_features, m.num_heads, m.head_dim


def _qkv_steps() -> list[Step]:
    return [Step("bind", "[q | k | v] ← W_qkv x + b_qkv", ("B", "N", "3*d"), "each viewed [H, E]", at="qkv")]


@builds("WindowAttention")
def _window(m: nn.Module) -> Card:
    d, H, E = _heads(m)
    return Card("WindowAttention", "mixer (local softmax attention)", [Var("x", X)], [Var("y", X)],
                [Hyper("d", d, "d_model"), Hyper("H", H, "num_heads"), Hyper("E", E, "d/H"),
                 Hyper("w", m.window_size, "window_size")],
                _linear("qkv", "qkv", "3*d", "d") + _linear("o", "proj", "d", "d"),
                [*_qkv_steps(),
                 Step("bind", "o ← sliding_window_attention(q, k, v; w)", ("B", "N", "H", "E"),
                      "keys j: i − w < j ≤ i"),
                 Step("return", "W_o o + b_o", X, at="proj", output=True)],
                sizes={"d": d, "H": H, "E": E}, uses=["sliding_window_attention"])


@builds("CausalAttention")
def _causal(m: nn.Module) -> Card:
    d, H, E = _heads(m)
    return Card("CausalAttention", "mixer (full causal softmax attention)", [Var("x", X)], [Var("y", X)],
                [Hyper("d", d, "d_model"), Hyper("H", H, "num_heads"), Hyper("E", E, "d/H")],
                _linear("qkv", "qkv", "3*d", "d") + _linear("o", "proj", "d", "d"),
                [*_qkv_steps(),
                 Step("bind", "o ← sliding_window_attention(q, k, v; w = N)", ("B", "N", "H", "E"),
                      "or SDPA flash (CPU, N ≥ 2048)"),
                 Step("return", "W_o o + b_o", X, at="proj", output=True)],
                sizes={"d": d, "H": H, "E": E}, uses=["sliding_window_attention"])


@builds("LinearAttention")
def _linear_mixer(m: nn.Module) -> Card:
    from agiformer_kernels.nn.linear_attention import EPS, FEATURE_EPS

    d, H, E = _heads(m)
    return Card("LinearAttention", "mixer (causal linear attention)", [Var("x", X)], [Var("y", X)],
                [Hyper("d", d, "d_model"), Hyper("H", H, "num_heads"), Hyper("E", E, "d/H"),
                 Hyper("ε_φ", FEATURE_EPS, "feature_eps"), Hyper("ε", EPS, "eps"),
                 Hyper("p", m.dropout.p, "dropout")],
                _linear("qkv", "qkv", "3*d", "d") + _linear("o", "out_proj", "d", "d")
                + [Param("γ", ("d",), "norm.weight"), Param("β", ("d",), "norm.bias")],
                [*_qkv_steps(),
                 Step("bind", "o ← linear_attention(q, k, v; φ = elu+1+ε_φ, ε)", ("B", "N", "H", "E"),
                      "state S ∈ ℝ^{H×E×E}, z ∈ ℝ^{H×E}"),
                 Step("bind", "a ← W_o o + b_o", X, at="out_proj"),
                 Step("return", "dropout_p(LayerNorm(a | γ, β))", X, at="norm", output=True)],
                sizes={"d": d, "H": H, "E": E}, uses=["linear_attention"])


# --- blocks -------------------------------------------------------------------------------------------------

def _block_hypers(m: nn.Module) -> list[Hyper]:
    return [Hyper("d", m.norm1.normalized_shape[-1], "d_model"),
            Hyper("mixers", " + ".join(m.mixer_slots), "mixer")]


def _mix_steps(m: nn.Module, into: str) -> list[Step]:
    steps = []
    for i, slot in enumerate(m.mixer_slots):
        name = card_of(getattr(m, slot)).name
        expr = f"{into} ← {name}(u | θ_{slot})" if i == 0 else f"{into} ← {into} + {name}(u | θ_{slot})"
        steps.append(Step("bind" if i == 0 else "update", expr, X, at=slot))  # the mixer's output
    return steps


def _children(m: nn.Module, names: list[str]) -> list[tuple[str, Card]]:
    return [(n, card_of(getattr(m, n))) for n in names]


@builds("HybridBlock")
def _hybrid(m: nn.Module) -> Card:
    d = m.norm1.normalized_shape[-1]
    return Card("HybridBlock", "block (v1: mixers side by side, out_proj)", [Var("x", X)], [Var("x", X)],
                _block_hypers(m), _linear("out", "out_proj", "d", "d"),
                [Step("bind", "u ← norm1(x)", X, at="norm1"), *_mix_steps(m, "m"),
                 Step("update", "x ← x + W_out m + b_out", X, at="out_proj", note="out_proj's output"),
                 Step("bind", "n ← norm_mlp(x)", X, at="norm_mlp"),
                 Step("update", "x ← x + mlp(n)", X, at="mlp", note="mlp's output"),
                 Step("return", "x", X, at="", output=True)],
                sizes={"d": d}, children=_children(m, ["norm1", *m.mixer_slots, "mlp", "norm_mlp"]))


@builds("SequentialBlock")
def _sequential(m: nn.Module) -> Card:
    d = m.norm1.normalized_shape[-1]
    return Card("SequentialBlock", "block (pre-norm)", [Var("x", X)], [Var("x", X)], _block_hypers(m), [],
                [Step("bind", "u ← norm1(x)", X, at="norm1"), *_mix_steps(m, "m"),
                 Step("update", "x ← x + m", X),
                 Step("bind", "n ← norm_mlp(x)", X, at="norm_mlp"),
                 Step("update", "x ← x + mlp(n)", X, at="mlp", note="mlp's output"),
                 Step("return", "x", X, at="", output=True)],
                sizes={"d": d}, children=_children(m, ["norm1", *m.mixer_slots, "norm_mlp", "mlp"]))


@builds("ParallelBlock")
def _parallel(m: nn.Module) -> Card:
    d = m.norm1.normalized_shape[-1]
    return Card("ParallelBlock", "block (parallel, GPT-J)", [Var("x", X)], [Var("x", X)], _block_hypers(m), [],
                [Step("bind", "u ← norm1(x)", X, at="norm1"), *_mix_steps(m, "m"),
                 Step("update", "x ← x + m + mlp(u)", X, at="mlp", note="mlp's output"),
                 Step("return", "x", X, at="", output=True)],
                sizes={"d": d}, children=_children(m, ["norm1", *m.mixer_slots, "mlp"]))


# --- embedding, top stages, head ----------------------------------------------------------------------------

@builds("ByteLatentEncoder")
def _encoder(m: nn.Module) -> Card:
    d, P = m.byte_embedding.embedding_dim, m.patch_size
    return Card("BytePatchEmbedding", "embedding (bytes → patches)",
                [Var("x", ("B", "L"), "bytes", "{0..255}")], [Var("e", X, "N = ⌊L/P⌋ patch vectors")],
                [Hyper("d", d, "d_model"), Hyper("P", P, "patch_size"), Hyper("p", m.dropout.p, "dropout")],
                [Param("W_e", (256, "d"), "byte_embedding.weight"),
                 Param("W_c", ("d", "d", "P"), "patch_conv.weight"), Param("b_c", ("d",), "patch_conv.bias"),
                 Param("γ", ("d",), "norm.weight"), Param("β", ("d",), "norm.bias")],
                [Step("bind", "e ← W_e[x_{1..N·P}]", ("B", "N*P", "d"), "trailing L mod P bytes dropped",
                      at="byte_embedding"),
                 Step("bind", "p_n ← W_c ⋆ e_{nP..nP+P−1} + b_c", X, "conv, kernel = stride = P"),
                 Step("bind", "p_n ← RoPE(p_n, n)", X, "angles n·10000^{−2i/d}"),
                 Step("return", "dropout_p(LayerNorm(p | γ, β))", X, at="norm", output=True)],
                sizes={"d": d, "P": P})


@builds("RecurrentReasoningBlock")
def _reasoning(m: nn.Module) -> Card:
    d = m.gate.in_features
    return Card("Reasoning", "top stage (gated thinking loop)", [Var("x", X)], [Var("x", X)],
                [Hyper("d", d, "d_model"), Hyper("T", m.thinking_steps, "thinking_steps")],
                _linear("g", "gate", "d", "d"),
                [Step("loop", "for τ = 1, …, T:"),
                 Step("bind", "n ← norm(x)", X, at="norm"),
                 Step("bind", "g ← W_g n + b_g", X, "σ(g) gates the update", at="gate"),
                 Step("update", "x ← x + σ(g) ⊙ think_mlp(n)", X, "weights shared across τ", at="think_mlp"),
                 Step("end", ""),
                 Step("return", "x", X, at="", output=True)],
                sizes={"d": d}, children=_children(m, ["think_mlp", "norm"]))


@builds("NoTop")
def _no_top(m: nn.Module) -> Card:
    return Card("NoTop", "top stage (identity)", [Var("x", X)], [Var("x", X)],
                steps=[Step("return", "x", X, at="", output=True)])


@builds("LocalAutoregressiveHead")
def _head(m: nn.Module) -> Card:
    d, h, P = m.proj_latent.in_features, m.proj_latent.out_features, m.patch_size
    return Card("GRUPatchHead", "head (GRU byte decoder)",
                [Var("z", X, "patch latents"), Var("y", ("B", "N*P"), "target bytes (training)", "{0..255}")],
                [Var("λ", ("B", "N", "P", 256), "logits (training; loss: gru_patch_loss, sampling: "
                      "gru_patch_sample)")],
                [Hyper("d", d, "d_model"), Hyper("h", h, "hidden_dim"), Hyper("P", P, "patch_size"),
                 Hyper("sos", 0, "sos")],
                _linear("c", "proj_latent", "h", "d") + [
                    Param("E", (256, "h"), "byte_emb.weight"),
                    Param("W_ih", ("3*h", "2*h"), "rnn.weight_ih_l0"), Param("W_hh", ("3*h", "h"), "rnn.weight_hh_l0"),
                    Param("b_ih", ("3*h",), "rnn.bias_ih_l0"), Param("b_hh", ("3*h",), "rnn.bias_hh_l0")]
                + _linear("o", "head", 256, "h"),
                [Step("bind", "c ← W_c z + b_c", ("B", "N", "h"), "M = B·N rows", at="proj_latent"),
                 Step("bind", "b ← [sos, y_1, …, y_{P−1}] per patch", ("B*N", "P"), "teacher forcing",
                      "{0..255}"),
                 Step("bind", "H ← gru_patch_decode(c, b | E, W_ih, W_hh, b_ih, b_hh)", ("B*N", "P", "h"),
                      "T = E·W_ih[:, :h]ᵀ factorisation"),
                 Step("bind", "λ ← W_o H + b_o", ("B*N", "P", 256), at="head"),
                 Step("return", "λ", ("B", "N", "P", 256), at="", output=True)],
                sizes={"d": d, "h": h, "P": P},
                uses=["gru_patch_decode", "gru_patch_byte_table", "gru_patch_loss", "gru_patch_sample"])


# --- the model ----------------------------------------------------------------------------------------------

SIZE_GLOSS = {"d_model": "d", "n_layers": "n_layers", "num_heads": "H", "patch_size": "P", "window_size": "w",
              "vocab_size": "V", "dropout": "p", "thinking_steps": "T"}
COMPONENT_KEYS = ("architecture", "embedding", "final_norm", "top", "head")


@builds("AGIFORMER")
def _model(m: nn.Module) -> Card:
    cfg = m.config
    d, P, n = cfg["d_model"], cfg["patch_size"], cfg["n_layers"]
    hypers = [Hyper(sym, cfg[key], key) for key, sym in SIZE_GLOSS.items()]
    blocks = [card_of(layer).name for layer in m.layers]
    stack = blocks[0] if len(set(blocks)) == 1 else ", ".join(blocks)
    top, head = card_of(m.top_stage), card_of(m.head)
    return Card("AGIFORMER", "model (byte-level patch LM)",
                [Var("x", ("B", "L"), "bytes", "{0..255}"),
                 Var("y", ("B", "N*P"), "next patches' bytes (training)", "{0..255}")],
                [Var("λ", ("B", "N", "P", 256), "logits of the bytes of patch n + 1")],
                hypers + [Hyper("blocks", stack, "architecture")], [],
                [Step("bind", "z ← BytePatchEmbedding(x | θ_encoder)", X, "N = ⌊L/P⌋", at="encoder"),
                 Step("loop", "for ℓ = 0, …, n_layers − 1:"),
                 Step("update", "z ← Block_ℓ(z | θ_layers.ℓ)", X, at=f"layers.{n - 1}",
                      note=f"ℓ: {stack}"),
                 Step("end", ""),
                 Step("bind", f"z ← {card_of(m.norm_f).name}(z | θ_norm_f)", X, at="norm_f"),
                 Step("bind", f"z ← {top.name}(z | θ_{m.top_slot})", X, at=m.top_slot),
                 Step("return", f"{head.name}(z, y | θ_head)", ("B", "N", "P", 256), at="", output=True)],
                sizes={"d": d, "P": P},
                children=
                [("encoder", card_of(m.encoder)), *[(f"layers.{i}", card_of(l)) for i, l in enumerate(m.layers)],
                 ("norm_f", card_of(m.norm_f)), (m.top_slot, top), ("head", head)],
                config={k: cfg[k] for k in COMPONENT_KEYS})


def config_of(card: Card) -> dict:
    """The model config a model card describes: its hyperparameters' values and its components (a round trip:
    ``AGIFORMER.from_config(config_of(model.algorithm()))`` has ``model``'s parameters)."""
    sizes = {h.key: h.value for h in card.hypers if h.key in SIZE_GLOSS}
    return {**sizes, **card.config}
