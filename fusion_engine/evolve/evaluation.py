"""User evaluations of a candidate merge: a Python callable or a shell command, higher is better.

* ``"package.module:function"`` — ``function(state_dict) -> float``, called with the merged state dict
  (name → tensor, on the search's device; read it, do not modify it). Nothing is written to disk.
* a shell command — the candidate is written as a full checkpoint folder (``fusion-engine merge`` of its
  recipe) into a temporary folder, whose path replaces ``{model}`` in the command (and is in the
  environment as ``FUSION_ENGINE_MODEL``); the last line the command prints is the score.
"""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import tempfile
from typing import Callable

import torch

from ..errors import ConfigError, FusionEngineError


class EvaluationError(FusionEngineError, RuntimeError):
    """An evaluation failed or did not return a number."""


def load_callable(spec: str) -> Callable:
    """``"module:function"`` (``module`` importable from the current directory too) -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--evaluate {spec!r}: write it as module:function (e.g. my_eval:score)")
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--evaluate {spec!r}: cannot import {module_name!r} ({exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"--evaluate {spec!r}: {module_name} has no function {attr!r}")
    return fn


def score_of(value, what: str) -> float:
    """``value`` as a finite float, or an EvaluationError naming ``what``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{what} returned {value!r}, not a number") from None
    if score != score or score in (float("inf"), float("-inf")):
        raise EvaluationError(f"{what} returned {score}, not a finite number")
    return score


def command_evaluation(command: str, timeout: float | None = None) -> Callable[[str], float]:
    """An evaluation of a recipe (YAML text) by ``command`` on the merged checkpoint (see the module docstring)."""
    from ..checkpoint.config import parse_config
    from ..checkpoint.executor import run_plan
    from ..checkpoint.planner import build_plan

    def evaluate(recipe: str) -> float:
        with tempfile.TemporaryDirectory(prefix="fe_evolve_") as work:
            model_dir = os.path.join(work, "model")
            run_plan(build_plan(parse_config(recipe, "recipe.yaml")), model_dir, quiet=True)
            cmd = command.replace("{model}", shlex.quote(model_dir))
            try:
                done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, "FUSION_ENGINE_MODEL": model_dir})
            except subprocess.TimeoutExpired:
                raise EvaluationError(f"evaluation command timed out after {timeout} s: {command}") from None
        if done.returncode != 0:
            raise EvaluationError(f"evaluation command exited with {done.returncode}: {command}\n"
                                  f"{done.stderr.strip()[-2000:]}")
        lines = done.stdout.strip().splitlines()
        return score_of(lines[-1] if lines else "", f"evaluation command {command!r} (last line of its output)")

    return evaluate
