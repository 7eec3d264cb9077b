"""``fusion-engine analyze``: the analysis report of checkpoints on disk or of a built-in example.

    fusion-engine analyze --example digits|tiny-lm [--out DIR]
    fusion-engine analyze MODEL [MODEL ...] --base BASE [--data PROMPTS.txt|.jsonl] [--out DIR]

Writes ``DIR/report.md`` and its PNG figures (default DIR: ``analysis``).
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="task-vector geometry, interpolation curves, barriers per layer, CKA",
                       description="Measure models the way the merging literature does and write a report "
                                   "(markdown + PNG figures): per-layer cosine similarity, sign conflicts and "
                                   "shared singular directions of the task vectors (with --base); with --data "
                                   "(causal LMs) or an --example, the linear-interpolation loss and accuracy, the "
                                   "barrier per layer, linear CKA layer by layer and the loss plane through three "
                                   "models.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="checkpoint folders or files (HF layout)")
    p.add_argument("--base", help="the common base model: task vectors are MODEL − BASE")
    p.add_argument("--data", help="prompts for causal LMs: a .txt (one per line) or .jsonl ('text' or 'prompt')")
    p.add_argument("--example", choices=("digits", "tiny-lm"), help="a built-in offline example instead of MODELs")
    p.add_argument("--out", default="analysis", help="output folder (default: analysis)")
    p.add_argument("--steps", type=int, default=11, help="points along each interpolation path (default 11)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples")
    return p


def run(args, parser: argparse.ArgumentParser) -> int:
    from .examples import checkpoint_analysis, digits_analysis, tiny_lm_analysis
    from .report import write_report

    if args.steps < 2:
        parser.error("analyze: --steps must be >= 2")
    if args.example and args.models:
        parser.error("analyze: give either MODELs or --example, not both")
    if args.example == "digits":
        report = digits_analysis(args.seed, steps=args.steps)
    elif args.example == "tiny-lm":
        report = tiny_lm_analysis(args.seed, steps=args.steps)
    else:
        if not args.models:
            parser.error("analyze: give MODEL folders (with --base and/or --data) or --example digits|tiny-lm")
        if args.base is None and args.data is None:
            parser.error("analyze: with MODELs, give --base (task-vector geometry) and/or --data (LM curves)")
        report = checkpoint_analysis(args.models, base=args.base, data=args.data, steps=args.steps)
    path = write_report(report, args.out)
    print(f"wrote {path}")
    return 0
