"""Print a model's algorithm card: ``python -m agiformer.card [CHECKPOINT | --preset NAME | --architecture FILE]
[--full] [--json]`` (default: the v1 preset). ``--write docs/v1-card.txt`` regenerates the file the docs keep."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .components import flavors
from .model import AGIFORMER


def model_of(args: argparse.Namespace) -> AGIFORMER:
    if args.checkpoint:
        from .checkpoint import load_model

        return load_model(args.checkpoint)[0]  # (model, checkpoint)
    if args.architecture:
        return AGIFORMER.from_config(json.loads(Path(args.architecture).read_text()))
    return AGIFORMER.from_config(flavors.flavor(args.preset or "v1"))


def text(model: AGIFORMER, full: bool, as_json: bool) -> str:
    if as_json:
        return json.dumps(model.algorithm().to_dict(), ensure_ascii=False, indent=1) + "\n"
    return model.algorithm_card_full() if full else model.algorithm_card() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m agiformer.card", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file")
    p.add_argument("--preset", help=f"a flavor: {', '.join(flavors.names())}")
    p.add_argument("--architecture", help="a model config JSON file")
    p.add_argument("--full", action="store_true", help="the sub-cards too: one block, each component, the ops")
    p.add_argument("--json", action="store_true", help="the structured card as JSON")
    p.add_argument("--write", metavar="FILE", help="write to FILE instead of printing")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.checkpoint, args.preset, args.architecture)) > 1:
        p.error("give one of CHECKPOINT, --preset, --architecture")
    out = text(model_of(args), args.full, args.json)
    if args.write:
        Path(args.write).write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
