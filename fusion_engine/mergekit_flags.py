"""mergekit-yaml's command-line options (mergekit 0.1.5, ``mergekit.options.MergeOptions``) on argparse.

``fusion-engine merge`` and ``fusion-engine-yaml`` accept every option of ``mergekit-yaml`` with
mergekit's spelling, defaults and meaning, so a mergekit user's command line runs unchanged:

* ``--cuda`` (and ``--gpu-rich``) is ``--device cuda``; ``--device auto`` picks cuda when usable;
* ``--random-seed N`` seeds the random methods (dare_*, della*, ...) whose config sets no ``random_seed``;
* ``--out-shard-size`` takes mergekit's counts: ``5B`` = 5 billion, ``500M``, ``10K`` or a plain
  number, compared (as mergekit 0.1.5's ``TensorWriter`` does) with the bytes of the tensors in a
  shard; a byte unit (``5GB``, ``500MB``, ``2GiB``) means bytes too. Default ``5B``;
* ``--copy-tokenizer/--no-copy-tokenizer``, ``--write-model-card/--no-write-model-card``
  (mergekit's README.md), ``-v`` (repeat: INFO, DEBUG), ``--quiet``, ``--num-threads/-j``;
* the options that change nothing here are accepted and say so at ``-v``; the two that would change
  the output in ways fusion_engine does not implement (``--no-safe-serialization``,
  ``--unsafe-truncate-embeddings``) are refused with a :class:`ConfigError`.

No torch at import time: the command line's ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger("fusion_engine")

# options accepted for mergekit compatibility that change nothing here, and why
NO_OPS = {
    "allow_crimes": "fusion_engine does not check architectures against each other; tensor shapes are checked",
    "transformers_cache": "models are local folders; nothing is downloaded",
    "lora_merge_cache": "BASE+LORA references are applied per tensor while streaming: nothing is cached",
    "lora_merge_dtype": "LoRA deltas are added in each base tensor's dtype, as PEFT's merge_and_unload does",
    "low_cpu_memory": "tensors are streamed one at a time; results always go to the host writer",
    "clone_tensors": "every output tensor is written from its own buffer",
    "trust_remote_code": "no model code is ever executed (only safetensors headers and config.json are read)",
    "lazy_unpickle": "inputs are read tensor by tensor (safetensors) already",
    "read_to_gpu": "inputs are read on the host and copied to --device per tensor",
    "multi_gpu": "one device per process; for several GPUs run under torchrun (see the README)",
    "async_write": "a writer thread always overlaps writing with merging",
    "write_threads": "one writer thread per process",
}
# the no-ops that take a value, and their defaults (the others are --flag/--no-flag, default off)
_VALUED_NO_OPS = {"transformers_cache": None, "lora_merge_cache": None, "lora_merge_dtype": None, "write_threads": 1}


@dataclass
class MergekitFlags:
    """The resolved options, in fusion_engine's terms."""

    device: str
    out_shard_size: int
    random_seed: int | None
    copy_tokenizer: bool
    write_model_card: bool
    verbosity: int
    quiet: bool
    num_threads: int | None


def _bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                        action=argparse.BooleanOptionalAction, help=help)


def add_mergekit_options(parser: argparse.ArgumentParser) -> None:
    """Add mergekit-yaml's options (and fusion_engine's ``--device``) to ``parser``."""
    group = parser.add_argument_group("mergekit-yaml options (mergekit 0.1.5 meaning; no-ops say so at -v)")
    group.add_argument("--device", default=None,
                       help="where tensors are merged: cpu (default), cuda, cuda:N or auto")
    _bool_flag(group, "cuda", False, "merge on the GPU (= --device cuda)")
    group.add_argument("--gpu-rich", action="store_true", help="alias for --cuda --low-cpu-memory --read-to-gpu "
                                                               "--multi-gpu")
    group.add_argument("--out-shard-size", default="5B",
                       help="largest output shard: mergekit's count 5B (default: 5 billion), 500M, 10K or a "
                            "number, compared with the shard's bytes as mergekit 0.1.5 does; or bytes with a "
                            "unit: 5GB, 500MB, 2GiB")
    _bool_flag(group, "copy_tokenizer", True, "copy the tokenizer files to the output (default: yes)")
    _bool_flag(group, "write_model_card", True, "write mergekit's README.md model card (default: yes)")
    group.add_argument("--random-seed", type=int, default=None,
                       help="seed of the random methods (dare_*, della*, ...) whose config sets no random_seed")
    group.add_argument("--num-threads", "-j", type=int, default=None, help="threads for CPU operations")
    group.add_argument("-v", dest="verbosity", action="count", default=0,
                       help="more logging: -v INFO (backends, no-op options), -vv DEBUG")
    group.add_argument("--quiet", "-q", action=argparse.BooleanOptionalAction, default=False,
                       help="no plan summary, no progress bar")
    _bool_flag(group, "safe_serialization", True, "write safetensors (the only format fusion_engine writes)")
    _bool_flag(group, "unsafe_truncate_embeddings", False, "not supported by fusion_engine (refused)")
    for name in NO_OPS:
        if name in _VALUED_NO_OPS:
            kind = int if name == "write_threads" else str
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=_VALUED_NO_OPS[name],
                               help="accepted, no-op")
        else:
            _bool_flag(group, name, False, "accepted, no-op")


def parse_shard_size(text: str | int) -> int:
    """mergekit's ``parse_kmb`` (``5B`` = 5e9, ``500M``, ``10K``, digits), else a byte size (``5GB``, ``2GiB``)."""
    from .io.writer import parse_size

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmb]?)", str(text).strip(), re.IGNORECASE)
    if match is None:
        return parse_size(text)
    size = int(float(match[1]) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match[2].lower()])
    if size <= 0:
        raise ConfigError(f"--out-shard-size {text!r} must be positive")
    return size


def configure_logging(verbosity: int) -> None:
    """mergekit's levels: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level, format="fusion-engine: %(levelname)s: %(message)s")
    logging.getLogger("fusion_engine").setLevel(level)


def resolve_mergekit_options(args: argparse.Namespace) -> MergekitFlags:
    """Validate the options, log the no-ops at INFO, and return what fusion_engine acts on."""
    if not args.safe_serialization:
        raise ConfigError("--no-safe-serialization: fusion_engine writes safetensors only; drop the option")
    if args.unsafe_truncate_embeddings:
        raise ConfigError("--unsafe-truncate-embeddings is not supported; give the models the same vocabulary "
                          "(or use a tokenizer configuration with mergekit)")
    if args.num_threads is not None and args.num_threads < 1:
        raise ConfigError(f"--num-threads must be >= 1, got {args.num_threads}")
    for name, why in NO_OPS.items():
        if getattr(args, name) != _VALUED_NO_OPS.get(name, False):
            log.info("--%s: accepted for mergekit compatibility, no effect here (%s)", name.replace("_", "-"), why)
    if args.gpu_rich:
        log.info("--gpu-rich: merging on cuda; its other parts are no-ops here")
    device = args.device or ("cuda" if args.cuda or args.gpu_rich else "cpu")
    return MergekitFlags(device=device, out_shard_size=parse_shard_size(args.out_shard_size),
                         random_seed=args.random_seed, copy_tokenizer=args.copy_tokenizer,
                         write_model_card=args.write_model_card, verbosity=args.verbosity, quiet=args.quiet,
                         num_threads=args.num_threads)
