"""Algorithm cards checked against the code: parameters, step shapes, round trip, the rendered v1 card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import agiformer_kernels as K
from agiformer import AGIFORMER
from agiformer.card import main as card_main
from agiformer.cards import config_of
from agiformer.components import flavors
from agiformer_kernels.cards import OP_CARDS, evaluate

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["v1", "tiny", "tiny-mixed"]


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    torch.manual_seed(0)
    return AGIFORMER.from_config(flavors.flavor(request.param)).eval()


def test_every_public_op_has_a_card():
    ops = [n for n in K.__all__ if n not in ("BackendError", "available_backends", "algorithm")]
    assert sorted(ops) == sorted(OP_CARDS)
    for name in ops:
        card = K.algorithm(name)
        assert card.render().startswith(f"Algorithm: {name}  [")
        json.dumps(card.to_dict(), ensure_ascii=False)
        assert any(s.output for s in card.steps)


def test_card_parameters_are_the_modules(model):
    card = model.algorithm()
    declared = card.all_params()
    assert len(declared) == len(dict(declared))
    assert dict(declared) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert card.param_count() == model.param_count()
    if model.config["d_model"] == 512:
        assert model.param_count() == 31_199_744
        assert "31,199,744 parameters" in model.algorithm_card()


def _checks(card, module, prefix=""):
    """(submodule path, declared dims, sizes) of every step that names the submodule computing it."""
    out = []
    for s in card.steps:
        if s.at is not None and s.dims is not None:
            out.append((f"{prefix}{s.at}".rstrip("."), s.dims, card.sizes))
    for attr, child in card.children:
        out += _checks(child, module, f"{prefix}{attr}.")
    return out


def test_every_observable_step_has_its_declared_shape(model):
    B, L = 3, 4 * 5 + 3  # odd sizes: 5 patches and 3 trailing bytes
    N = L // model.patch_size
    checks = _checks(model.algorithm(), model)
    seen, hooks = {}, []
    for path in {p for p, _, _ in checks}:
        sub = model.get_submodule(path) if path else model
        hooks.append(sub.register_forward_hook(lambda m, i, o, path=path: seen.__setitem__(path, tuple(o.shape))))
    x = torch.randint(0, 256, (B, L))
    y = torch.randint(0, 256, (B, N * model.patch_size))
    with torch.no_grad():
        model(x, y)
    for h in hooks:
        h.remove()
    assert len(checks) > 10
    for path, dims, sizes in checks:
        env = {"d": model.config["d_model"], **sizes, "B": B, "L": L, "N": N}
        observed = seen[path]
        if dims and dims[0] == "…":
            observed, dims = observed[-(len(dims) - 1):], dims[1:]
        assert observed == evaluate(dims, env), (path, dims)


def test_hyperparameters_come_from_the_instance():
    cfg = flavors.flavor("tiny")
    cfg["architecture"]["mixer"][0]["window_size"] = 7
    card = AGIFORMER.from_config(cfg).layers[1].attn.algorithm()
    assert {h.symbol: h.value for h in card.hypers}["w"] == 7


def test_round_trip_from_the_card(model):
    rebuilt = AGIFORMER.from_config(config_of(model.algorithm()))
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]


def test_cards_fit_100_columns(model):
    text = model.algorithm_card_full()
    assert max(len(line) for line in text.splitlines()) <= 100


def test_docs_v1_card_is_current(tmp_path):
    out = tmp_path / "card.txt"
    card_main(["--preset", "v1", "--full", "--write", str(out)])
    assert "31,199,744" in out.read_text()
    assert (ROOT / "docs" / "v1-card.txt").read_text() == out.read_text(), (
        "regenerate: python -m agiformer.card --preset v1 --full --write docs/v1-card.txt")
