"""Tiny Llama checkpoints shared by the config / CLI tests (built once per test session).

``tiny_llamas()`` saves a seeded base and three variants with ``save_pretrained`` (safetensors, a
character tokenizer): hidden 64, 4 layers, vocab 128, about 0.6 MB each. Tests must not modify
them; tests that need a broken checkpoint copy one with :func:`copy_model`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

from fusion_engine.cli import main as cli_main
from fusion_engine.demo import build_tiny_llamas

_ROOT = tempfile.mkdtemp(prefix="fe_cli_tests_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_llamas(num_layers: int = 4, hidden: int = 64, tie: bool = False, n_models: int = 3) -> dict[str, str]:
    """{"base", "model_0", ...} -> folder, built once per argument set for the whole session."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder = os.path.join(_ROOT, f"llama_l{num_layers}_h{hidden}_t{int(tie)}_n{n_models}")
    return build_tiny_llamas(folder, n_models=n_models, num_layers=num_layers, hidden=hidden,
                             tie_word_embeddings=tie, seed=1234 + num_layers + hidden)


def scratch(name: str) -> str:
    """A fresh empty folder under the session's temporary root."""
    path = tempfile.mkdtemp(prefix=f"{name}_", dir=_ROOT)
    return path


def copy_model(src: str, dest: str) -> str:
    shutil.copytree(src, dest)
    return dest


def write(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def load_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (all shards)."""
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def run_cli(*argv: str) -> int:
    return cli_main([str(a) for a in argv])


def run_cli_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m fusion_engine ARGV`` in a child process (the installed entry point's code path), started
    outside the source checkout so that ``-m`` does not import the source tree in place of the package."""
    return subprocess.run([sys.executable, "-m", "fusion_engine", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=_ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@contextlib.contextmanager
def time_bound(seconds: int):
    """Fail (instead of hanging the suite) when the block runs past ``seconds``."""
    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tree(folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` (path -> bytes): inputs must come out of any run unchanged."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out
