"""The ``fusion-engine moe`` subcommand (arguments and run), kept beside the MoE builder."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("moe", help="build a Mixtral / Qwen-MoE model from dense experts (mergekit-moe YAML)",
                       description="Assemble a mixture-of-experts model from dense fine-tunes as mergekit-moe does: "
                                   "attention, embeddings and norms from base_model, each expert's MLP as one "
                                   "expert per layer, routers from the prompts (gate_mode hidden / cheap_embed) or "
                                   "random. Output: Mixtral, Qwen2-MoE (one shared expert) or Qwen3-MoE, loadable "
                                   "with transformers' AutoModelForCausalLM.")
    p.add_argument("config", metavar="CONFIG", help="mergekit-moe YAML file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --allow-overwrite)")
    p.add_argument("--device", default="cpu", help="where the base model runs for hidden-state gates (cpu, cuda)")
    p.add_argument("--gate-dtype", default="bfloat16",
                   help="dtype of the forward pass for hidden gates (default bfloat16, as mergekit-moe)")
    p.add_argument("--random-seed", type=int, default=None,
                   help="seed for random gates and noise_scale (random gates then equal mergekit-moe --random-seed)")
    p.add_argument("--allow-all-same", "--i-understand-this-is-not-useful-without-training", action="store_true",
                   dest="allow_all_same", help="allow every expert to be the same model")
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    return p


def run(args: argparse.Namespace, device: str) -> int:
    from ..checkpoint.config import DTYPES
    from .build import build_moe

    gate_dtype = DTYPES.get(args.gate_dtype.removeprefix("torch."))
    if gate_dtype is None:
        raise ConfigError(f"--gate-dtype {args.gate_dtype!r} is not a floating dtype (use bfloat16, float16 or "
                          f"float32)")
    summary = build_moe(args.config, args.out_dir, device=device, gate_dtype=gate_dtype, seed=args.random_seed,
                        allow_all_same=args.allow_all_same, allow_overwrite=args.allow_overwrite,
                        out_shard_size=args.out_shard_size)
    if not args.quiet:
        print(f"wrote {summary['out_dir']}: {summary['architecture']} with {summary['experts']} experts, "
              f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB in {summary['seconds']:.2f} s")
    return 0
