"""The ``fusion-engine extract-lora`` and ``merge-adapters`` subcommands (arguments and run), beside the LoRA code."""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p_lora = sub.add_parser("extract-lora", help="a PEFT LoRA adapter approximating MODEL - BASE_MODEL",
                            description="Extract a PEFT LoRA adapter from a fine-tuned model and its base "
                                        "(mergekit-extract-lora's flags): truncated SVD of every linear and "
                                        "convolution delta, embeddings and norms saved whole; prints per module "
                                        "the rank and the fraction of the delta's energy kept.")
    p_lora.add_argument("--model", required=True, help="fine-tuned model (folder, file or BASE+LORA)")
    p_lora.add_argument("--base-model", required=True, help="base model (folder, file or BASE+LORA)")
    p_lora.add_argument("--out-path", required=True, help="adapter folder to write")
    p_lora.add_argument("--max-rank", type=int, default=128, help="largest rank per module (default 128)")
    p_lora.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values <= this (default 0)")
    p_lora.add_argument("--modules-to-save", "--save-module", dest="modules_to_save", action="append", default=[],
                        metavar="MODULE", help="store this module whole (repeatable)")
    p_lora.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                        help="decompose embeddings too (default: store them whole)")
    p_lora.add_argument("--skip-undecomposable", action="store_true", help="drop norms and other non-matrices "
                                                                            "instead of storing them whole")
    p_lora.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                        help="sqrt(S) in both factors (default) or S in A")
    p_lora.add_argument("--include-regex", "-i", dest="include_regexes", action="append", default=[],
                        help="decompose only modules matching (repeatable)")
    p_lora.add_argument("--exclude-regex", "-e", dest="exclude_regexes", action="append", default=[],
                        help="leave out modules matching (repeatable)")
    p_lora.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    p_lora.add_argument("--lora-merge-cache", default=None, help="accepted for mergekit compatibility; unused")
    p_lora.add_argument("--allow-overwrite", action="store_true", help="replace --out-path if it exists")
    p_lora.add_argument("--quiet", "-q", action="store_true", help="no per-module report")

    p_madp = sub.add_parser("merge-adapters", help="merge PEFT LoRA adapters into one adapter",
                            description="Merge PEFT LoRA adapters of one base model into one LoRA adapter, on the "
                                        "products B·A (no cross-terms): cat, linear (task arithmetic), ties, "
                                        "dare_linear, dare_ties, magnitude_prune, and knots_<method> (merged in a "
                                        "shared SVD basis); ranks per module in rank_pattern.")
    p_madp.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders (adapter_config.json + "
                                                                       "adapter_model.safetensors)")
    p_madp.add_argument("--out-path", required=True, help="adapter folder to write")
    p_madp.add_argument("--weights", type=float, nargs="+", default=None, help="one per adapter (default: all 1)")
    p_madp.add_argument("--method", default="linear", help="cat, linear (default), ties, dare_linear, dare_ties, "
                                                           "magnitude_prune, knots_linear, knots_ties, ...")
    p_madp.add_argument("--rank", type=int, default=None, help="output rank per module (default: exact for cat, "
                                                              "linear and knots; the largest input rank otherwise)")
    p_madp.add_argument("--density", type=float, default=None, help="fraction kept (ties, dare_*, magnitude_prune)")
    p_madp.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"))
    p_madp.add_argument("--seed", type=int, default=None, help="seed of the DARE masks")
    p_madp.add_argument("--allow-overwrite", action="store_true", help="replace --out-path if it exists")
    p_madp.add_argument("--quiet", "-q", action="store_true", help="print nothing")


def run(args: argparse.Namespace, device: str) -> int:
    if args.command == "extract-lora":
        from .extract import extract_lora, format_reports

        reports = extract_lora(args.model, args.base_model, args.out_path, max_rank=args.max_rank,
                               sv_epsilon=args.sv_epsilon, modules_to_save=args.modules_to_save,
                               embed_lora=args.embed_lora, skip_undecomposable=args.skip_undecomposable,
                               distribute_scale=args.distribute_scale, include_regexes=args.include_regexes,
                               exclude_regexes=args.exclude_regexes, device=device,
                               allow_overwrite=args.allow_overwrite)
        if not args.quiet:
            print(f"wrote {os.path.abspath(args.out_path)}:\n{format_reports(reports)}")
        return 0
    from .adapter_merge import merge_adapters

    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    ranks = merge_adapters(args.adapters, weights, args.out_path, args.method, rank=args.rank, density=args.density,
                           majority_sign_method=args.majority_sign_method, seed=args.seed,
                           allow_overwrite=args.allow_overwrite)
    if not args.quiet:
        print(f"wrote {os.path.abspath(args.out_path)}: {len(ranks)} modules, ranks "
              f"{min(ranks.values())}..{max(ranks.values())}")
    return 0
