"""The ``fusion-engine evolve`` subcommand (arguments and run), kept beside the search."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evolve", help="evolutionary (CMA-ES) search of a merge recipe's weights and densities",
                       description="Search the per-model weights / densities (optionally per-layer gradients) of a "
                                   "mergekit YAML with CMA-ES: every candidate is merged in memory and scored by "
                                   "your evaluation (higher is better). The search state is saved after every "
                                   "generation (--resume continues it); the best recipe so far is printed and "
                                   "written as a YAML that `fusion-engine merge` reproduces bit for bit.")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="template mergekit YAML (a models: list)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--evaluate", metavar="MODULE:FUNCTION",
                     help="Python function scoring the merged state dict: FUNCTION(state_dict) -> float")
    how.add_argument("--evaluate-command", metavar="CMD",
                     help="shell command scoring a written candidate ({model} = its folder; last output line = score)")
    how.add_argument("--example", choices=["digits"],
                     help="the built-in example: task arithmetic on the digits task set (offline, ~1 minute)")
    p.add_argument("--out", default=None, help="best recipe YAML (default: evolve_best.yaml; the example: in --workdir)")
    p.add_argument("--state", default=None, help="search state file (default: OUT.state)")
    p.add_argument("--resume", action="store_true", help="continue the search saved in --state")
    p.add_argument("--params", default=None, help="comma-separated per-model parameters to search "
                                                  "(default: weight, and density when the method has it)")
    p.add_argument("--points", type=int, default=None,
                   help="values per parameter: 1 = a scalar, N >= 2 = a gradient over the layers "
                        "(default 1; the example: 3)")
    p.add_argument("--bounds", action="append", default=[], metavar="PARAM=LOW:HIGH",
                   help="search range of a parameter (default weight 0:1, density 0.1:1)")
    p.add_argument("--allow-negative-weights", action="store_true", help="weights in [-1, 1]")
    p.add_argument("--generations", type=int, default=None, help="CMA-ES generations (default 20; the example: 30)")
    p.add_argument("--population", type=int, default=None, help="candidates per generation (default 4 + 3 ln D)")
    p.add_argument("--sigma", type=float, default=0.2, help="initial step size in the unit cube (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (and of the example's task set)")
    p.add_argument("--device", default="cpu", help="where candidates are merged (cpu, cuda)")
    p.add_argument("--workdir", default="evolve_digits", help="the example's checkpoints and outputs")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per --evaluate-command run")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the result")
    return p


def _bounds(items: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for item in items:
        name, _, rng = item.partition("=")
        low, _, high = rng.partition(":")
        try:
            out[name.strip()] = (float(low), float(high))
        except ValueError:
            raise ConfigError(f"--bounds {item!r}: write PARAM=LOW:HIGH, e.g. weight=0:1") from None
    return out


def run(args: argparse.Namespace, device: str) -> int:
    from ..checkpoint.config import read_config_file
    from .digits import run_digits_example
    from .evaluation import command_evaluation, load_callable
    from .search import evolve
    from .space import SearchSpace

    log = None if args.quiet else print
    if args.example:
        run_digits_example(args.workdir, generations=args.generations or 30, population=args.population,
                           points=args.points or 3, sigma=args.sigma, seed=args.seed, device=device,
                           resume=args.resume, log=print)
        return 0
    if not args.config:
        raise ConfigError("fusion-engine evolve: give the template CONFIG (or --example digits)")
    text = read_config_file(args.config)
    params = [p.strip() for p in args.params.split(",")] if args.params else None
    space = SearchSpace(text, params, points=args.points or 1, bounds=_bounds(args.bounds),
                        allow_negative_weights=args.allow_negative_weights, filename=args.config)
    out = args.out or "evolve_best.yaml"
    kwargs = {"evaluate": load_callable(args.evaluate)} if args.evaluate else \
        {"evaluate_recipe": command_evaluation(args.evaluate_command, args.timeout)}
    result = evolve(space, **kwargs, generations=args.generations or 20, population=args.population,
                    sigma=args.sigma, seed=args.seed, device=device, state_path=args.state or f"{out}.state",
                    resume=args.resume, out_path=out, log=log)
    print(f"best score {result.best_score:.6g} after {result.evaluations} recipes ({result.generations} "
          f"generations): {out}")
    return 0
