"""The ``fusion-engine`` command (and ``fusion-engine-yaml``, mergekit-yaml's command line).

    fusion-engine merge CONFIG OUT_DIR   merge checkpoints as a mergekit YAML config says; takes every
                                         mergekit-yaml option (see fusion_engine.mergekit_flags)
    fusion-engine-yaml CONFIG OUT_DIR    the same, as mergekit-yaml's command line
    fusion-engine moe CONFIG OUT_DIR     build a Mixtral / Qwen-MoE model from dense experts (mergekit-moe YAML)
    fusion-engine evolve [CONFIG]        CMA-ES search of a merge recipe (or --example digits)
    fusion-engine extract-lora ...       a PEFT LoRA adapter from a fine-tuned model and its base (SVD)
    fusion-engine merge-adapters ...     PEFT LoRA adapters merged into one adapter (on the products B·A)
    fusion-engine demo                   build tiny seeded Llama checkpoints, merge them with `merge`,
                                         load the result with transformers and generate a few tokens
    fusion-engine selftest               merge small seeded MLPs with every op on every usable backend
                                         and check each against the torch reference
    fusion-engine backends               which backends can run here, and why not
    fusion-engine evaluate               the merge-method table on scikit-learn's digits; writes
                                         ./fusion-engine-eval/results.md and barrier.png
    fusion-engine measure MODEL --data F Fisher / Gram statistics of a causal LM on local prompts
    fusion-engine analyze                task-vector geometry, interpolation curves, barriers per
                                         layer, CKA and loss planes of models; writes a report

Exit codes: 0 ok; 2 bad arguments or bad input (config, checkpoints, shapes, missing tensors,
existing output folder), with the message on stderr; 130 interrupted (Ctrl-C); 1 any other failure.

Nothing heavy is imported at module level (torch comes with the first command that needs it), so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import __version__
from .analysis import command as analysis_command
from .data_aware import command as measure_command
from .evolve import command as evolve_command
from .lora import command as lora_command
from .moe import command as moe_command
from .errors import (
    CheckpointError,
    ConfigError,
    DTypeMismatchError,
    FusionEngineError,
    MissingTensorError,
    NonFiniteError,
    ShapeMismatchError,
)
from .mergekit_flags import add_mergekit_options, configure_logging, resolve_mergekit_options

USER_INPUT_ERRORS = (ConfigError, ShapeMismatchError, MissingTensorError, CheckpointError, DTypeMismatchError,
                     NonFiniteError)
log = logging.getLogger("fusion_engine")


# --------------------------------------------------------------------------- selftest (ops x backends)


def _selftest_models(K: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A seeded pre-trained MLP state dict and K fine-tuned variants (small random task vectors)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (256, 64), "0.bias": (256,), "2.weight": (256, 256), "2.bias": (256,),
              "4.weight": (10, 256), "4.bias": (10,)}
    base = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    finetuned = [{name: (w + torch.randn(w.shape, generator=g) * 0.01).to(torch.bfloat16) for name, w in base.items()}
                 for _ in range(K)]
    return {name: w.to(torch.bfloat16) for name, w in base.items()}, finetuned


def _selftest_ops(base, finetuned, name):
    from . import ops

    xs = [m[name] for m in finetuned]
    b = base[name]
    weights = [1.0 / len(xs)] * len(xs)
    return {
        "linear_merge": lambda backend: ops.linear_merge(xs, weights, backend=backend),
        "task_arithmetic": lambda backend: ops.task_arithmetic(b, xs, weights, lam=1.0, backend=backend),
        "ties_merge": lambda backend: ops.ties_merge(b, xs, weights, 0.2, backend=backend),
        "dare_merge": lambda backend: ops.dare_merge(b, xs, weights, 0.5, seed=0, stream=ops.stream_id(name),
                                                     consensus="sum", backend=backend),
        "fisher_merge": lambda backend: ops.fisher_merge(xs, [x.abs() for x in xs], weights, backend=backend),
    }


def selftest(K: int = 3) -> int:
    """Merge K seeded bf16 MLPs with every op on every usable backend; compare with the torch reference."""
    import torch

    from ._dispatch import backends

    usable = [name for name, status in backends().items() if status.usable and name != "cuda"]
    usable = [name for name in usable if name != "triton" or torch.cuda.is_available()]
    print(f"fusion_engine {__version__}: merging {K} fine-tuned bf16 MLPs into their base; backends: {', '.join(usable)}")
    base, finetuned = _selftest_models(K)
    worst = 0.0
    for method in _selftest_ops(base, finetuned, "0.weight"):
        line = [f"  {method:16s}"]
        for backend in usable:
            _selftest_ops(base, finetuned, "0.weight")[method](backend)  # warm-up: thread pool, page faults
            start = time.perf_counter()
            merged = {name: _selftest_ops(base, finetuned, name)[method](backend) for name in base}
            elapsed = time.perf_counter() - start
            reference = {name: _selftest_ops(base, finetuned, name)[method]("torch") for name in base}
            diff = max(float((merged[n].float() - reference[n].float()).abs().max()) for n in base)
            worst = max(worst, diff)
            line.append(f"{backend}: {elapsed * 1e3:6.2f} ms (max |Δ| vs torch {diff:.1e})")
        print("  ".join(line))
    n_params = sum(w.numel() for w in base.values())
    print(f"merged {len(base)} tensors, {n_params:,} parameters per model; all backends agree with the reference "
          f"to {worst:.1e}")
    return 0


# --------------------------------------------------------------------------- merge


def _check_device(device: str) -> str:
    import torch

    if device == "auto":  # mergekit's --device auto
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is usable here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")
    return device


def merge(config_path: str, out_dir: str, *, device: str = "cpu", out_shard_size: str | int = "5B",
          dry_run: bool = False, allow_overwrite: bool = False, quiet: bool = False, random_seed: int | None = None,
          copy_tokenizer: bool = True, write_model_card: bool = True) -> int:
    """``fusion-engine merge``: parse, validate and plan (headers only), then stream the merge.

    Everything that can be checked without reading tensor data is checked first: the config, the
    models' paths and headers, every needed tensor and its shape, the method's parameters, then the
    output folder and the device. ``dry_run`` stops after printing the plan. ``out_shard_size``,
    ``random_seed``, ``copy_tokenizer`` and ``write_model_card`` have mergekit-yaml's meaning
    (:mod:`fusion_engine.mergekit_flags`); the model card is mergekit's README.md
    (:mod:`fusion_engine.checkpoint.card`).
    """
    from ._dispatch import backends_used
    from .checkpoint.card import card_for_output
    from .checkpoint.config import Setting, load_config
    from .checkpoint.executor import run_plan
    from .checkpoint.plan import TOKENIZER_FILES
    from .checkpoint.planner import build_plan, plan_summary
    from .io import Checkpoints
    from .io.atomic import check_output_dir
    from .mergekit_flags import parse_shard_size
    from .methods.registry import get as get_method

    shard_bytes = parse_shard_size(out_shard_size)
    config = load_config(config_path)
    if random_seed is not None and "random_seed" in get_method(config.merge_method).parameter_names:
        config.parameters.setdefault("random_seed", Setting("random_seed", random_seed, None))
    start = time.perf_counter()
    with Checkpoints() as checkpoints:  # each input opened once: planner, summary and executor share them
        plan = build_plan(config, config_path, checkpoints=checkpoints)
        device = _check_device(device)
        if not copy_tokenizer:
            plan.extra_files = {k: v for k, v in plan.extra_files.items() if k not in TOKENIZER_FILES}
        if write_model_card:
            plan.generated_files["README.md"] = card_for_output(config, out_dir)
        # under torchrun every rank plans (cheap, headers only); only rank 0 talks
        speaks = int(os.environ.get("RANK", "0")) == 0
        if speaks and (dry_run or not quiet):
            print(f"plan for {config_path} ({time.perf_counter() - start:.2f} s, no tensor read):")
            print(plan_summary(plan, config, checkpoints=checkpoints))
        if dry_run:
            print("dry run: nothing written")
            return 0
        check_output_dir(out_dir, allow_overwrite)
        summary = run_plan(plan, out_dir, device=device, out_shard_size=shard_bytes, allow_overwrite=allow_overwrite,
                           quiet=quiet, checkpoints=checkpoints)
    ran = ", ".join(f"{name} ({calls} calls)" for name, calls in sorted(backends_used().items())) or "none (copies)"
    log.info("backends that ran: %s", ran)
    if speaks and not quiet:
        seconds = summary.get("seconds", time.perf_counter() - start)
        print(f"wrote {summary.get('out_dir', os.path.abspath(out_dir))}: {summary.get('tensors', len(plan.tasks))} "
              f"tensors, {summary.get('bytes_written', 0) / 2**20:.1f} MiB in {seconds:.2f} s on {device}; "
              f"backends: {ran}")
    return 0


def merge_from_args(args: argparse.Namespace) -> int:
    """``merge`` with mergekit-yaml's options as parsed by :func:`add_mergekit_options`."""
    flags = resolve_mergekit_options(args)
    if flags.num_threads is not None:
        import torch

        torch.set_num_threads(flags.num_threads)
    return merge(args.config, args.out_dir, device=flags.device, out_shard_size=flags.out_shard_size,
                 dry_run=args.dry_run, allow_overwrite=args.allow_overwrite, quiet=flags.quiet,
                 random_seed=flags.random_seed, copy_tokenizer=flags.copy_tokenizer,
                 write_model_card=flags.write_model_card)


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="mergekit YAML file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --allow-overwrite)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the plan (tensors, bytes, method per group); write nothing")
    parser.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_mergekit_options(parser)


# --------------------------------------------------------------------------- argument parsing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-engine", description="Fast, exact model merging.",
                                     epilog="Exit codes: 0 ok, 2 bad arguments or input, 130 interrupted, "
                                            "1 other failure.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_merge = sub.add_parser("merge", help="merge checkpoints as a mergekit YAML config says",
                             description="Merge local checkpoints as a mergekit YAML config says (merge_method, "
                                         "models or slices, base_model, parameters with gradients and filters, "
                                         "dtype, out_dtype, tokenizer_source). The whole config is validated "
                                         "against the checkpoints' headers before any tensor is read; the output "
                                         "folder appears only when complete.")
    _add_merge_arguments(p_merge)

    lora_command.add_parser(sub)
    moe_command.add_parser(sub)
    evolve_command.add_parser(sub)

    p_demo = sub.add_parser("demo", help="merge tiny seeded Llama checkpoints end to end and generate",
                            description="Build a tiny seeded Llama and three fine-tuned variants (a few MB), "
                                        "write a mergekit YAML for them, merge it with `fusion-engine merge`, "
                                        "load the result with transformers and generate a few tokens.")
    p_demo.add_argument("--workdir", default=None,
                        help="keep the checkpoints, config and merged model here (default: a temporary folder)")
    p_demo.add_argument("--device", default="cpu", help="where tensors are merged (cpu or cuda)")
    p_demo.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")

    p_self = sub.add_parser("selftest", help="run every op on every usable backend against the torch reference",
                            description="Merge small seeded bf16 MLPs with every op on every usable backend, "
                                        "check each against the torch reference, print the times.")
    p_self.add_argument("--models", type=int, default=3, help="number of fine-tuned models (default 3)")

    sub.add_parser("backends", help="show which backends can run here", description="Show which backends "
                   "(triton, cuda, cpp, torch) can run here, and why not.")

    p_eval = sub.add_parser("evaluate", help="the merge-method table on scikit-learn's digits",
                            description="Pre-train an MLP on scikit-learn's digits, fine-tune it per task, merge "
                                        "with every method (average, task arithmetic, TIES, DARE, Fisher, RegMean, "
                                        "AdaMerging, ensemble) and align two independent models (weight matching, "
                                        "OT fusion, loss barrier). Prints the tables, writes OUT/results.md and "
                                        "OUT/barrier.png. Needs scikit-learn and matplotlib.")
    p_eval.add_argument("--out", default="fusion-engine-eval",
                        help="output folder (default: ./fusion-engine-eval)")
    p_eval.add_argument("--seed", type=int, default=0, help="seed of the data split, training and merges")
    p_eval.add_argument("--no-alignment", action="store_true", help="skip the two-model alignment part")

    analysis_command.add_parser(sub)
    measure_command.add_parser(sub)
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run one parsed command; errors become exit codes (2 bad input, 130 interrupted, 1 other)."""
    try:
        configure_logging(getattr(args, "verbosity", 0))
        if args.command == "merge":
            return merge_from_args(args)
        if args.command == "moe":
            return moe_command.run(args, _check_device(args.device))
        if args.command == "evolve":
            return evolve_command.run(args, _check_device(args.device))
        if args.command in ("extract-lora", "merge-adapters"):
            return lora_command.run(args, _check_device(getattr(args, "device", "cpu")))
        if args.command == "demo":
            from .demo import run_demo

            device = _check_device(args.device)
            return run_demo(lambda config, out_dir: merge(config, out_dir, device=device, allow_overwrite=True,
                                                          quiet=args.quiet), args.workdir, quiet=args.quiet)
        if args.command == "selftest":
            if args.models < 1:
                parser.error("--models must be >= 1")
            return selftest(args.models)
        if args.command == "evaluate":
            from .bench.evaluate import main as evaluate_main

            return evaluate_main(["--out", args.out, "--seed", str(args.seed)]
                                 + (["--no-alignment"] if args.no_alignment else []))
        if args.command == "analyze":
            return analysis_command.run(args, parser)
        if args.command == "measure":
            return measure_command.run(args, parser)
        from ._dispatch import backends

        for name, status in backends().items():
            print(f"{name:8s} {status!r}")
        return 0
    except USER_INPUT_ERRORS as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports, it does not trace back
        kind = "" if isinstance(exc, FusionEngineError) else f"{type(exc).__name__}: "
        print(f"{parser.prog}: failed: {kind}{exc}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    parser = _parser()
    return _run(parser, parser.parse_args(argv))


def yaml_main(argv=None) -> int:
    """``fusion-engine-yaml CONFIG OUT_DIR [mergekit-yaml options]``: mergekit-yaml's command line."""
    parser = argparse.ArgumentParser(prog="fusion-engine-yaml",
                                     description="mergekit-yaml on fusion_engine: merge checkpoints as a mergekit "
                                                 "YAML config says, with mergekit-yaml's options. mergekit itself "
                                                 "is not needed.",
                                     epilog="Exit codes: 0 ok, 2 bad arguments or input, 130 interrupted, "
                                            "1 other failure.")
    _add_merge_arguments(parser)
    parser.set_defaults(command="merge")
    return _run(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
