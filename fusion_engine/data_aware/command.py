"""``fusion-engine measure``: Fisher / Gram / activation statistics of an HF causal LM on local prompts.

    fusion-engine measure MODEL --data PROMPTS [--out STATS.safetensors] [--fisher empirical|sampled|none]
                          [--no-gram] [--activations] [--batch-size 8] [--max-prompts N] [--max-tokens 256]
                          [--device cpu] [--dtype float32] [--seed 0]

Writes one safetensors file (default: ``MODEL.stats.safetensors`` beside the model folder; the model
folder itself is never written) that the YAML methods ``fisher`` and ``regmean`` read.
"""

from __future__ import annotations

import argparse
import os
import time

DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("measure", help="Fisher and Gram statistics of a causal LM on local prompts",
                       description="Stream local prompts through an HF causal LM and write its statistics as "
                                   "safetensors: the diagonal Fisher (per-example squared gradients) and the "
                                   "Gram matrices XᵀX of every linear layer's inputs (RegMean), optionally "
                                   "per-channel activation means and variances. The YAML methods `fisher` and "
                                   "`regmean` read the file.")
    p.add_argument("model", metavar="MODEL", help="HF causal-LM folder (config.json, weights, tokenizer)")
    p.add_argument("--data", required=True, help="prompts: .txt (one per line), .jsonl ('text'/'prompt'), or "
                                                 ".safetensors/.pt with an 'input_ids' tensor [n, length]")
    p.add_argument("--out", help="statistics file (default: MODEL.stats.safetensors beside the model folder)")
    p.add_argument("--fisher", default="empirical", choices=("empirical", "sampled", "none"),
                   help="empirical: gradients at the data's next tokens; sampled: at tokens drawn from the "
                        "model; none: no Fisher (default empirical)")
    p.add_argument("--no-gram", action="store_true", help="skip the Gram matrices")
    p.add_argument("--activations", action="store_true", help="also per-channel activation means and variances")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per prompt at most (default 256)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype while measuring")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled Fisher's labels")
    return p


def run(args, parser: argparse.ArgumentParser) -> int:
    import torch

    from ..errors import CheckpointError, ConfigError
    from ..io.prompts import load_token_ids
    from ..io.statistics import save_statistics
    from .measure import measure_statistics

    if args.batch_size < 1 or args.max_tokens < 2 or (args.max_prompts is not None and args.max_prompts < 1):
        parser.error("measure: --batch-size >= 1, --max-tokens >= 2 and --max-prompts >= 1")
    if not os.path.isdir(args.model):
        raise ConfigError(f"{args.model}: not a model folder (an HF causal-LM folder with config.json)")
    out = args.out or os.path.normpath(args.model) + ".stats.safetensors"
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder; give a file name such as stats.safetensors")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    ids = load_token_ids(args.data, args.model, max_prompts=args.max_prompts, max_tokens=args.max_tokens)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{args.model}: cannot be loaded as a causal LM by transformers ({exc})") from exc
    start = time.perf_counter()
    batches = [ids[i:i + args.batch_size].to(device) for i in range(0, len(ids), args.batch_size)]
    stats = measure_statistics(model, batches, fisher=None if args.fisher == "none" else args.fisher,
                               gram=not args.no_gram, activations=args.activations, causal_lm=True, seed=args.seed)
    save_statistics(stats, out, metadata={"model": os.path.abspath(args.model), "data": os.path.abspath(args.data),
                                          "fisher": args.fisher, "sequences": len(ids), "tokens": ids.numel(),
                                          "dtype": args.dtype})
    print(f"measured {len(ids)} sequences of {ids.shape[1]} tokens in {time.perf_counter() - start:.1f} s: "
          f"{sum(k.startswith('fisher.') for k in stats)} Fisher tensors, {sum(k.startswith('gram.') for k in stats)} "
          f"Gram matrices; wrote {out}")
    return 0
