"""Named model configs ("flavors"), one JSON file each in this folder: ``v1`` (the original, 31.2M
parameters), ``tiny`` (v1's architecture at 1.57M, for CPU runs) and ``tiny-mixed`` (a heterogeneous
stack: a v1 hybrid layer with a 16-patch window, a sequential linear-attention layer with a SwiGLU MLP and
RMSNorm, a parallel full-causal-attention layer with a GeGLU MLP; RMS final norm, no thinking loop).

``python -m agiformer.train --architecture tiny-mixed`` trains one; ``AGIFORMER.from_config(flavor("tiny-mixed"))``
builds one.
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.json"))


def path(name: str) -> Path:
    """The JSON file of flavor ``name``; ``ValueError`` listing the flavors for an unknown one."""
    file = FOLDER / f"{name}.json"
    if not file.is_file():
        raise ValueError(f"no flavor {name!r}; the flavors: {', '.join(names())}")
    return file


def flavor(name: str) -> dict:
    """The model config of flavor ``name`` (a fresh dict)."""
    return json.loads(path(name).read_text())
