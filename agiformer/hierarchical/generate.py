"""Continue a prompt with a hierarchical checkpoint (prompt -> codes -> top LM -> expanders -> bytes).

    python -m agiformer.hierarchical.generate runs/hier-tiny-top/last.pt --prompt "def main(" -n 300
    python -m agiformer.hierarchical.generate runs/hier-tiny-top/last.pt --prompt-file p.py --temperature 0.8 --seed 1

Writes the prompt's continuation (the new bytes only) to stdout, and its speed to stderr.
"""

from __future__ import annotations

from .. import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import sys
import time
from typing import Optional

import torch

from .. import _cli
from ..evaluate import default_device
from .evaluate import load_model


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.hierarchical.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of agiformer.hierarchical.train (of its top stage, for a "
                                           "trained top LM)")
    _cli.add_prompt(parser, "The ")
    parser.add_argument("-n", "--max-new-bytes", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    parser.add_argument("--quiet", action="store_true", help="no speed report on stderr")
    args = parser.parse_args(argv)
    _cli.at_least(parser, args, 1, "max_new_bytes")
    _cli.at_least(parser, args, 0, "temperature")
    _cli.check_device(parser, args.device)
    _cli.check_backend(parser, args.backend)
    prompt = _cli.read_prompt(parser, args)
    if not prompt:
        parser.error("--prompt: empty (at least one byte)")

    with _cli.user_errors(parser):
        model, _ = load_model(args.checkpoint, device=args.device, backend=args.backend)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        new = model.generate_bytes(prompt, args.max_new_bytes, args.temperature, generator=generator)
    except KeyboardInterrupt:
        _cli.interrupted(parser)
    elapsed = time.perf_counter() - start
    sys.stdout.buffer.write(new)
    sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    if not args.quiet:
        print(f"{len(new)} bytes in {elapsed:.2f} s ({len(new) / elapsed:,.0f} bytes/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
