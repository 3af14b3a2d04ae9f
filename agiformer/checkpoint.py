"""Checkpoints: ours (model, optimizer, scheduler, RNG, step, config) and original v1 state_dicts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .model import AGIFORMER, DEFAULT_CONFIG

FORMAT = "agiformer-checkpoint-1"


def save(path: os.PathLike, **contents: Any) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **contents}, tmp)
    os.replace(tmp, path)


def read(path: os.PathLike, map_location: Any = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def _unwrap(ckpt: dict) -> tuple[dict, Optional[dict]]:
    """(model state_dict, config or None) of either format."""
    if ckpt.get("format") == FORMAT:
        return ckpt["model"], ckpt["config"]
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key], ckpt.get("config")
    if "encoder.byte_embedding.weight" in ckpt:
        return ckpt, None
    raise ValueError("not an AGIFORMER checkpoint: no model state_dict found")


def infer_config(state: dict, overrides: Optional[dict] = None) -> dict:
    """A v1 state_dict's config: sizes read off the weights; num_heads, window_size and thinking_steps
    do not show in the shapes and take v1's defaults unless ``overrides`` names them."""
    config = dict(DEFAULT_CONFIG)
    config["d_model"] = state["encoder.byte_embedding.weight"].shape[1]
    config["patch_size"] = state["encoder.patch_conv.weight"].shape[2]
    config["n_layers"] = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config


def load_model(path: os.PathLike, *, device: Any = "cpu", backend: Optional[str] = None,
               overrides: Optional[dict] = None) -> tuple[AGIFORMER, dict]:
    """(model in eval mode, checkpoint dict) from our checkpoint or an original v1 ``best_model.pth``."""
    ckpt = read(path)
    state, config = _unwrap(ckpt)
    if config is None:
        config = infer_config(state, overrides)
    else:
        config = {**config, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    model = AGIFORMER(**config, backend=backend)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), ckpt
