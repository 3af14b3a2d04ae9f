"""The hierarchical autoencoder's config: a plain JSON-serialisable dict, its defaults and its one validator.

```
{"levels": [LEVEL, ...],            one per compression level, bottom (bytes) first; 1 or more
 "top_lm": TOP | null,              the language model over the top level's codes (null: none)
 "ngram": 2,                        each token's input vector sums the embeddings of it and the n − 1 before it
 "loss_weights": {...}}             weight of each loss in ``out.loss`` (the keys of LOSS_WEIGHTS)

LEVEL = {"d_model", "num_heads",
         "compressor_layers", "expander_layers", "window_size",     the local transformers (window attention)
         "num_queries", "codebook_size", "code_dim",                segment pooling and the codes
         "code_window", "cross_layers", "max_offset",               what the expander reads of the codes
         "segmenter": {"rule", "threshold", "delta", "max_len", "target_len", "adapt_decay"},
         "vq": {"ema", "decay", "dead_threshold", "reset_interval", "buffer_size"}}
TOP = {"d_model", "num_heads", "n_layers", "mixer", "window_size"}  mixer: "linear_attention" or "window_attention"
```

Omitted keys take the defaults below; ``validate`` returns the complete config (``model.config``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

FOLDER = Path(__file__).resolve().parent / "configs"

SEGMENTER = dict(rule="global", threshold=2.0, delta=None, max_len=16, target_len=None, adapt_decay=0.9)
VQ = dict(ema=True, decay=0.99, dead_threshold=0.05, reset_interval=20, buffer_size=2048)
LEVEL = dict(d_model=64, num_heads=4, compressor_layers=1, expander_layers=1, window_size=64, num_queries=1,
             codebook_size=256, code_dim=32, code_window=8, cross_layers=1, max_offset=16)
TOP_LM = dict(d_model=64, num_heads=4, n_layers=1, mixer="linear_attention", window_size=64)
LOSS_WEIGHTS = dict(reconstruction=1.0, commitment=0.25, codebook=1.0, entropy_lm=0.5, causal_lm=1.0, top_lm=1.0)
KEYS = ("levels", "top_lm", "ngram", "loss_weights")
TOP_MIXERS = ("linear_attention", "window_attention")


def names() -> list[str]:
    """The named configs (JSON files in ``agiformer/hierarchical/configs/``)."""
    return sorted(p.stem for p in FOLDER.glob("*.json"))


def load_config(name_or_path: Union[str, Path]) -> dict:
    """The validated config named ``name_or_path`` (a file of ``configs/``) or read from that JSON file."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a config name or a path, got {type(name_or_path).__name__}")
    file = FOLDER / f"{name_or_path}.json"
    if not file.is_file():
        file = Path(name_or_path)
        if not file.is_file():
            raise ValueError(f"name_or_path = {str(name_or_path)!r}: neither a config name ({', '.join(names())}) "
                             f"nor a JSON file")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"name_or_path = {str(file)!r}: not valid JSON ({e})") from None
    return validate(config)


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} = {value!r}: must be an integer")
    if value < minimum:
        raise ValueError(f"{where} = {value}: must be at least {minimum}")
    return value


def _number(where: str, value: Any, low: float = -math.inf, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{where} = {value!r}: must be a number")
    if value < low or value > high or (open_low and value == low) or (open_high and value == high):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{where} = {value!r}: must lie in {lo}{low}, {high}{hi}")
    return float(value)


def _fill(where: str, given: Any, defaults: dict) -> dict:
    if not isinstance(given, Mapping):
        raise ValueError(f"{where} = {given!r}: must be a dict")
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise TypeError(f"{where}: unknown key {unknown[0]!r} (the keys: {', '.join(defaults)})")
    return {**copy.deepcopy(defaults), **copy.deepcopy(dict(given))}


def _heads(where: str, d: int, h: int) -> None:
    if d % h:
        raise ValueError(f"{where}.num_heads = {h}: must divide d_model = {d}")


def _segmenter(where: str, given: Any) -> dict:
    s = _fill(where, given, SEGMENTER)
    if s["rule"] not in ("global", "delta"):
        raise ValueError(f"{where}.rule = {s['rule']!r}: one of 'global', 'delta'")
    if s["rule"] == "global":
        if s["threshold"] is None:
            raise ValueError(f"{where}.threshold: required for rule 'global'")
        if s["delta"] is not None:
            raise ValueError(f"{where}.delta = {s['delta']!r}: applies to rule 'delta' only (give null)")
    else:
        if s["delta"] is None:
            raise ValueError(f"{where}.delta: required for rule 'delta'")
        # Generation decides a byte's segment before the byte exists: a non-negative delta and threshold let a
        # zero-entropy placeholder never cut (docs in model.py).
        s["delta"] = _number(f"{where}.delta", s["delta"], 0.0)
    if s["threshold"] is not None:
        s["threshold"] = _number(f"{where}.threshold", s["threshold"], 0.0)
    if s["max_len"] is not None:
        _int(f"{where}.max_len", s["max_len"], 1)
    if s["target_len"] is not None:
        if s["threshold"] is None:
            raise ValueError(f"{where}.target_len: adapts the threshold, so threshold must be given")
        s["target_len"] = _number(f"{where}.target_len", s["target_len"], 1.0, open_low=True)
    s["adapt_decay"] = _number(f"{where}.adapt_decay", s["adapt_decay"], 0.0, 1.0, open_high=True)
    return s


def _vq(where: str, given: Any) -> dict:
    v = _fill(where, given, VQ)
    if not isinstance(v["ema"], bool):
        raise ValueError(f"{where}.ema = {v['ema']!r}: must be true or false")
    v["decay"] = _number(f"{where}.decay", v["decay"], 0.0, 1.0, open_high=True)
    v["dead_threshold"] = _number(f"{where}.dead_threshold", v["dead_threshold"], 0.0, 1.0, open_low=True,
                                  open_high=True)
    _int(f"{where}.reset_interval", v["reset_interval"], 0)
    _int(f"{where}.buffer_size", v["buffer_size"], 1)
    return v


def _level(where: str, given: Any) -> dict:
    level = _fill(where, given, {**LEVEL, "segmenter": SEGMENTER, "vq": VQ})
    for key in ("d_model", "num_heads", "compressor_layers", "expander_layers", "window_size", "num_queries",
                "codebook_size", "code_dim", "code_window", "cross_layers"):
        _int(f"{where}.{key}", level[key], 1)
    _int(f"{where}.max_offset", level["max_offset"], 0)
    _heads(where, level["d_model"], level["num_heads"])
    level["segmenter"] = _segmenter(f"{where}.segmenter", level["segmenter"])
    level["vq"] = _vq(f"{where}.vq", level["vq"])
    return level


def validate(config: Any = None) -> dict:
    """``config`` (None: the defaults, one level and no top LM) with every omitted key filled in, as a fresh
    JSON-able dict. ``ValueError`` for a bad value and ``TypeError`` for an unknown key, each naming its
    place (``levels[1].segmenter.rule``)."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = [k for k in config if k not in KEYS]
    if unknown:
        raise TypeError(f"config: unknown key {unknown[0]!r} (the keys: {', '.join(KEYS)})")
    levels = config.get("levels", [{}])
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError(f"levels = {levels!r}: a non-empty list of level dicts")
    out = {"levels": [_level(f"levels[{i}]", lv) for i, lv in enumerate(levels)]}
    top = config.get("top_lm")
    if top is not None:
        top = _fill("top_lm", top, TOP_LM)
        for key in ("d_model", "num_heads", "n_layers", "window_size"):
            _int(f"top_lm.{key}", top[key], 1)
        _heads("top_lm", top["d_model"], top["num_heads"])
        if top["mixer"] not in TOP_MIXERS:
            raise ValueError(f"top_lm.mixer = {top['mixer']!r}: one of {', '.join(TOP_MIXERS)}")
    out["top_lm"] = top
    out["ngram"] = _int("ngram", config.get("ngram", 2), 1)
    weights = _fill("loss_weights", config.get("loss_weights", {}), LOSS_WEIGHTS)
    out["loss_weights"] = {k: _number(f"loss_weights.{k}", w, 0.0) for k, w in weights.items()}
    try:
        return json.loads(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: not JSON-serialisable ({e})") from None
