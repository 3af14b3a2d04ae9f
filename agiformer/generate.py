"""Sample from a checkpoint, streaming text as it is produced.

    python -m agiformer.generate runs/tiny/last.pt --prompt "def main(" -n 300
    python -m agiformer.generate best_model.pth --prompt "The " --temperature 0.8 --top-k 40 --seed 1
    python -m agiformer.generate runs/tiny/last.pt --prompts-file prompts.txt -n 200 --stop $'\\n\\n'

Prompts are not padded: a prompt ending inside a patch has its last bytes forced through the byte
decoder. A prompt must hold at least one whole patch (patch_size bytes, 4 by default).
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
import sys
import time
from typing import Optional

from . import _cli, checkpoint
from .evaluate import add_model_overrides, check_common, default_device, model_overrides
from .generation import stream


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="our checkpoint (.pt) or an original v1 best_model.pth")
    src = _cli.add_prompt(parser, "The ", file_help="one prompt: the whole file's bytes")
    src.add_argument("--prompts-file", help="a batch: one prompt per line")
    parser.add_argument("-n", "--max-new-bytes", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest bytes (1 to 256)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--stop", help="stop a row after any of these bytes (backslash escapes allowed, e.g. '\\n')")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--backend", help="op backend (default: fastest available)")
    parser.add_argument("--quiet", action="store_true", help="no speed report on stderr")
    add_model_overrides(parser)
    args = parser.parse_args(argv)
    _cli.at_least(parser, args, 1, "max_new_bytes", "top_k")
    _cli.at_least(parser, args, 0, "temperature")
    if args.top_k is not None and args.top_k > 256:
        parser.error(f"--top-k {args.top_k}: there are 256 bytes")
    check_common(parser, args)
    stop = _cli.unescape(parser, "--stop", args.stop) if args.stop else None

    if args.prompts_file:
        text = _cli.read_bytes(parser, "--prompts-file", args.prompts_file)
        prompts = [line.rstrip(b"\r") for line in text.split(b"\n") if line.strip()]
        if not prompts:
            parser.error(f"--prompts-file {args.prompts_file}: no prompt in it (every line is blank)")
    else:
        prompts = [_cli.read_prompt(parser, args)]
    with _cli.user_errors(parser):
        model, _ = checkpoint.load_model(args.checkpoint, device=args.device, backend=args.backend,
                                         overrides=model_overrides(args))
    short = [i for i, p in enumerate(prompts) if len(p) < model.patch_size]
    if short:
        parser.error(f"prompt(s) {short} hold fewer than patch_size = {model.patch_size} bytes: the model predicts "
                     f"bytes only from a complete patch before them")
    kw = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed, stop_bytes=stop)
    out = sys.stdout.buffer
    start = time.perf_counter()
    pieces = [[] for _ in prompts]
    if len(prompts) == 1:
        out.write(prompts[0])
    try:
        for chunk in stream(model, prompts, args.max_new_bytes, **kw):
            if len(prompts) == 1:
                out.write(chunk[0])
                out.flush()
            for piece, new in zip(pieces, chunk):
                piece.append(new)
    except KeyboardInterrupt:
        out.write(b"\n")
        out.flush()
        _cli.interrupted(parser)
    elapsed = time.perf_counter() - start
    if len(prompts) > 1:
        for i, (prompt, piece) in enumerate(zip(prompts, pieces)):
            out.write(b"=== %d ===\n" % i + prompt + b"".join(piece) + b"\n")
    else:
        out.write(b"\n")
    out.flush()
    if not args.quiet:
        total = sum(len(b"".join(p)) for p in pieces)
        print(f"[{total} bytes in {elapsed:.2f} s: {total / elapsed:,.0f} bytes/s, batch {len(prompts)}]",
              file=sys.stderr)


if __name__ == "__main__":
    main()
