"""The model config: a plain JSON-serialisable dict and its one validator.

Keys: the sizes (v1's constructor arguments), ``architecture`` (one layer dict for every layer, or a list of
``n_layers`` layer dicts) and the model-level components ``embedding``, ``final_norm``, ``top``, ``head``.
A layer dict holds ``block_cls`` and the block's ``mixer`` (a dict, or a list of dicts side by side), ``mlp``
and ``norm`` specs; each spec holds its ``*_cls`` and that component's options. Omitted keys take v1's
choices; sizes the options leave out (``window_size``, ``num_heads``, ``thinking_steps``) are the model's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .blocks import BLOCKS
from .embeddings import EMBEDDINGS
from .heads import HEADS
from .mixers import MIXERS
from .mlps import MLPS
from .norms import NORMS
from .registry import LocatedError, LocatedTypeError, Registry, require_int
from .tops import TOPS

# v1's sizes: ``AGIFORMER()``'s constructor arguments.
SIZES = dict(d_model=512, n_layers=6, num_heads=8, patch_size=4, window_size=128, vocab_size=256, dropout=0.1,
             thinking_steps=3)
V1_MIXERS = [{"mixer_cls": "window_attention"}, {"mixer_cls": "linear_attention"}]
V1_LAYER = {"block_cls": "hybrid", "mixer": V1_MIXERS, "mlp": {"mlp_cls": "mlp"}, "norm": {"norm_cls": "layer"}}
# Model-level components: config key -> (registry, v1's choice).
PARTS: dict[str, tuple[Registry, str]] = {
    "embedding": (EMBEDDINGS, "byte_patch"),
    "final_norm": (NORMS, "layer"),
    "top": (TOPS, "reasoning"),
    "head": (HEADS, "gru_patch"),
}
MODEL_KEYS = (*SIZES, "architecture", *PARTS)


def _check_sizes(cfg: dict) -> None:
    for key in ("d_model", "n_layers", "num_heads", "patch_size", "window_size"):
        require_located(key, cfg[key], 1)
    require_located("thinking_steps", cfg["thinking_steps"], 0)
    if cfg["vocab_size"] != 256:
        raise LocatedError(f"AGIFORMER models bytes: vocab_size must be 256, got {cfg['vocab_size']}")
    dropout = cfg["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LocatedError(f"dropout = {dropout!r}: must lie in [0, 1)")


def require_located(key: str, value: Any, minimum: int) -> None:
    try:
        require_int(key, value, minimum)
    except ValueError as e:
        raise LocatedError(str(e)) from None


def layer_spec(spec: Any, where: str) -> dict:
    """A layer dict with every component named (v1's where omitted), its names registered and its keys
    options the components take."""
    if not isinstance(spec, (Mapping, str)):
        raise LocatedError(f"{where} = {spec!r}: a layer is a dict (block_cls, mixer, mlp, norm)")
    spec = BLOCKS.check(spec, where, default="hybrid")
    mixer = spec.get("mixer", V1_MIXERS)
    if isinstance(mixer, (Mapping, str)):
        mixer = MIXERS.check(mixer, f"{where}.mixer")
    elif isinstance(mixer, (list, tuple)) and mixer:
        mixer = [MIXERS.check(m, f"{where}.mixer[{j}]") for j, m in enumerate(mixer)]
    else:
        raise LocatedError(f"{where}.mixer = {mixer!r}: a mixer dict or a non-empty list of them")
    return {**spec, "mixer": mixer,
            "mlp": MLPS.check(spec.get("mlp", {}), f"{where}.mlp", default="mlp"),
            "norm": NORMS.check(spec.get("norm", {}), f"{where}.norm", default="layer")}


def validate(config: Mapping) -> dict:
    """``config`` with every omitted key given v1's choice: the form ``AGIFORMER.from_config`` builds and
    ``model.config`` holds. Raises ``ValueError`` for an unknown component name, a bad size or a list of
    layers whose length is not ``n_layers``, and ``TypeError`` for an unknown key; each message names the
    place (``architecture[2].mixer[0]``). Option values are checked when the components are built."""
    if not isinstance(config, Mapping):
        raise LocatedTypeError(f"a model config is a dict, got {type(config).__name__}")
    unknown = [k for k in config if k not in MODEL_KEYS]
    if unknown:
        raise LocatedTypeError(f"config: unknown key {unknown[0]!r} (the keys: {', '.join(MODEL_KEYS)})")
    cfg = {**SIZES, **{k: v for k, v in config.items() if k in SIZES}}
    _check_sizes(cfg)
    arch = config.get("architecture")
    if arch is None:
        arch = V1_LAYER
    if isinstance(arch, Mapping):
        cfg["architecture"] = layer_spec(arch, "architecture")
    elif isinstance(arch, (list, tuple)):
        if len(arch) != cfg["n_layers"]:
            raise LocatedError(f"architecture: a list of {len(arch)} layer dicts for n_layers = {cfg['n_layers']} "
                               f"(one dict applies to every layer)")
        cfg["architecture"] = [layer_spec(spec, f"architecture[{i}]") for i, spec in enumerate(arch)]
    else:
        raise LocatedError(f"architecture = {arch!r}: a layer dict (every layer) or a list of n_layers of them")
    for key, (registry, default) in PARTS.items():
        cfg[key] = registry.check(config.get(key) or {}, key, default=default)
    try:  # a copy in JSON's own types (tuples become lists), sharing nothing with the caller's dicts
        return json.loads(json.dumps(cfg, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise LocatedError(f"config: not JSON-serialisable ({e})") from None


def layers(config: dict) -> list[tuple[str, dict]]:
    """(path, layer dict) of each layer of a validated config."""
    arch = config["architecture"]
    if isinstance(arch, list):
        return [(f"architecture[{i}]", spec) for i, spec in enumerate(arch)]
    return [("architecture", arch)] * config["n_layers"]
