"""PEFT LoRA adapters read from disk, and their weight deltas computed one tensor at a time.

A LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") replaces a
weight ``W`` (``out × in``) by

.. math::  W' = W + s \\, B A, \\qquad s = \\alpha / r \\quad (\\alpha / \\sqrt{r} \\text{ with rsLoRA})

where ``A`` is ``r × in``, ``B`` is ``out × r``, ``r`` and ``α`` come from ``adapter_config.json``
(``r``/``lora_alpha``, overridden per module by the regex keys of ``rank_pattern``/``alpha_pattern``,
PEFT's ``get_pattern_key`` rule) and rsLoRA is Kalajdzievski (2023). PEFT's layer kinds:

* linear: ``Δ = s·B·A`` (transposed when ``fan_in_fan_out``, e.g. GPT-2's ``Conv1D``), and with
  ``lora_bias`` the bias gains ``s·b_B``;
* embedding (``lora_embedding_A`` ``r × vocab``, ``lora_embedding_B`` ``dim × r``): ``Δ = s·(B·A)ᵀ``;
* convolution (``A`` a ``r × in × k…`` kernel, ``B`` ``out × r × 1…``): ``Δ = s·conv(Aᵀ, B)ᵀ``, a
  matrix product when the kernel is 1×1;
* ``modules_to_save`` and saved embedding layers (``<module>.base_layer.weight``): whole tensors
  stored in the adapter replace the base's (before the LoRA delta is added).

The weights are those ``PeftModel.save_pretrained`` writes: ``adapter_model.safetensors`` (or
``adapter_model.bin``) with keys ``base_model.model.<module>.lora_A.weight`` and so on. Everything
is checked when the adapter is opened against its base (tensors exist, ranks agree with the config,
``B·A`` has the base weight's shape); a fault raises :class:`~fusion_engine.errors.CheckpointError`
naming the adapter's file and the module.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..io import Checkpoint, open_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<adapter>[^.]+))??(?:\.(?P<param>weight|bias))?$")
_UNSUPPORTED = {"lora_magnitude_vector": "DoRA adapters (use_dora) are not supported; merge_and_unload them "
                                         "with PEFT first",
                "trainable_tokens_delta": "trainable-token adapters are not supported",
                "lora_E": "AdaLoRA adapters are not supported"}
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first key ``k`` of ``patterns`` with ``re.match(rf"(.*\\.)?({k})$",
    module)``, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """``s = α / r``, or ``α / √r`` for rank-stabilised LoRA (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoraModule:
    """The LoRA factors of one base module (tensor names inside the adapter file)."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    a: str
    b: str
    bias: str | None
    embedding: bool
    rank: int
    scaling: float

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


class LoraAdapter:
    """A PEFT LoRA adapter folder, opened lazily (headers only until :meth:`apply` reads factors).

    Parameters
    ----------
    path : folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.config_file = os.path.join(self.path, ADAPTER_CONFIG)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"LoRA adapter {self.path}: no such folder (give the folder PEFT's "
                                  "save_pretrained wrote)")
        if not os.path.isfile(self.config_file):
            raise CheckpointError(f"{self.config_file}: missing; a PEFT LoRA adapter folder needs its "
                                  "adapter_config.json (fix: save the adapter with PeftModel.save_pretrained)")
        try:
            with open(self.config_file, encoding="utf-8") as fh:
                self.config = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.config_file}: not readable JSON ({exc})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.config_file}: must hold a JSON object")
        kind = str(self.config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise CheckpointError(f"{self.config_file}: peft_type {kind} is not LoRA (only LoRA adapters apply)")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.config_file}: {_UNSUPPORTED['lora_magnitude_vector']}")
        weights = [os.path.join(self.path, n) for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(self.path, n))]
        if not weights:
            raise CheckpointError(f"LoRA adapter {self.path}: no {' or '.join(ADAPTER_WEIGHTS)}")
        self.weights_file = weights[0]
        self._file: Checkpoint = open_checkpoint(self.weights_file)
        self.modules: dict[str, LoraModule] = {}  # base weight name -> factors
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter tensor name (modules_to_save)
        self.bias_of: dict[str, LoraModule] = {}  # base bias name -> module with a lora_B bias
        try:
            self._index()
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------ parsing
    def _error(self, problem: str, fix: str | None = None) -> CheckpointError:
        return CheckpointError(f"{self.weights_file}: {problem}" + (f" (fix: {fix})" if fix else ""))

    def _index(self) -> None:
        cfg = self.config
        parts: dict[str, dict[str, str]] = {}
        for key in self._file.names():
            name = key.removeprefix(PEFT_PREFIX)
            for marker, why in _UNSUPPORTED.items():
                if marker in name.split("."):
                    raise self._error(f"tensor {key!r}: {why}")
            m = _LORA_KEY.match(name)
            if m is None:  # a whole tensor: modules_to_save, or a saved (resized) embedding's base_layer
                self.replacements[re.sub(r"\.(?:modules_to_save\.[^.]+|base_layer)\.", ".", name)] = key
                continue
            slot = m["part"] + ("_bias" if m["param"] == "bias" else "")
            parts.setdefault(m["module"], {})[slot] = key
        if not parts and not self.replacements:
            raise self._error("holds no LoRA tensors", "save the adapter with PeftModel.save_pretrained")
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rslora = bool(cfg.get("use_rslora", False))
        for module, found in parts.items():
            embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            missing = [k for k in (a_key, b_key) if k not in found]
            if missing:
                raise self._error(f"module {module!r} has no {missing[0]} factor")
            rank = pattern_value(cfg.get("rank_pattern"), module, r)
            mod_alpha = pattern_value(cfg.get("alpha_pattern"), module, alpha)
            a_shape = self._file.info(found[a_key]).shape
            if a_shape[0] != rank:
                raise self._error(f"tensor {found[a_key]!r} has rank {a_shape[0]} but {ADAPTER_CONFIG} gives "
                                  f"module {module!r} r={rank}", "fix r / rank_pattern in adapter_config.json")
            lm = LoraModule(module, found[a_key], found[b_key], found.get("lora_B_bias"), embedding, rank,
                            lora_scaling(mod_alpha, rank, rslora))
            self.modules[lm.weight_name] = lm
            if lm.bias is not None:
                self.bias_of[f"{module}.bias"] = lm

    # ------------------------------------------------------------------ checks against a base
    def delta_shape(self, lm: LoraModule) -> tuple[int, ...]:
        """The shape of ``Δ`` for one module, from the factors' headers."""
        a, b = self._file.info(lm.a).shape, self._file.info(lm.b).shape
        if lm.embedding:
            return (a[1], b[0])
        if len(a) > 2:  # convolution: out × in/groups × kernel
            return (b[0], a[1], *a[2:])
        out = (b[0], a[1])
        return out[::-1] if self.config.get("fan_in_fan_out") else out

    def check_against(self, base: Checkpoint) -> None:
        """Every LoRA module and saved module must exist in ``base`` with a matching shape."""
        names = set(base.names())
        for weight, lm in self.modules.items():
            if weight not in names:
                raise self._error(f"target module {lm.module!r} is not in the base model {base.path} (no tensor "
                                  f"{weight!r})", "apply the adapter to the model it was trained on")
            a, b = self._file.info(lm.a).shape, self._file.info(lm.b).shape
            if b[1] != a[0]:
                raise self._error(f"module {lm.module!r}: B {list(b)} and A {list(a)} do not share the rank")
            want = tuple(base.info(weight).shape)
            if self.delta_shape(lm) != want:
                raise self._error(f"module {lm.module!r}: B·A has shape {list(self.delta_shape(lm))} but the base "
                                  f"weight {weight!r} has {list(want)}", "apply the adapter to the model it was "
                                  "trained on")
        for bias, lm in self.bias_of.items():
            if bias not in names:
                raise self._error(f"module {lm.module!r} has a lora_B bias (lora_bias) but the base has no {bias!r}")
        for name, key in self.replacements.items():
            if name not in names:
                raise self._error(f"saved module tensor {key!r}: the base model {base.path} has no {name!r}",
                                  "apply the adapter to the model it was trained on")
            have, want = self._file.info(key).shape, base.info(name).shape
            if tuple(have) != tuple(want):
                raise self._error(f"saved module tensor {key!r} has shape {list(have)} but the base's {name!r} has "
                                  f"{list(want)}")
        targets = self.config.get("target_modules")
        if isinstance(targets, list) and self.modules:
            modules = {n.rsplit(".", 1)[0] for n in names}
            unknown = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
            if unknown:
                raise CheckpointError(f"{self.config_file}: target_modules {unknown} match no module of the base "
                                      f"model {base.path}")

    # ------------------------------------------------------------------ deltas
    def touches(self, name: str) -> bool:
        return name in self.modules or name in self.replacements or name in self.bias_of

    def delta(self, name: str) -> torch.Tensor:
        """``s·B·A`` for the base weight ``name`` (PEFT's ``get_delta_weight``): computed in float32, returned
        in the factors' dtype."""
        lm = self.modules[name]
        a, b = self._file.read(lm.a), self._file.read(lm.b)
        dtype = a.dtype if lm.embedding else b.dtype
        a, b = a.float(), b.float()
        if lm.embedding:
            out = (b @ a).T
        elif a.dim() > 2:
            if all(k == 1 for k in a.shape[2:]):
                out = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], *a.shape[2:])
            else:
                out = _CONV[a.dim()](a.transpose(0, 1), b).transpose(0, 1)
        else:
            out = (b @ a).T if self.config.get("fan_in_fan_out") else b @ a
        return (out * lm.scaling).to(dtype)

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The base tensor ``name`` with this adapter merged, written into ``tensor`` (a private buffer).

        ``W += Δ`` in place, rounded as PEFT's ``merge`` rounds: once for linear and convolution layers,
        and after casting ``Δ`` to ``W``'s dtype for embeddings.
        """
        if name in self.replacements:
            tensor.copy_(self._file.read(self.replacements[name]))
        if name in self.modules:
            delta = self.delta(name)
            return tensor.add_(delta.to(tensor.dtype) if self.modules[name].embedding else delta)
        if name in self.bias_of:
            lm = self.bias_of[name]
            return tensor.add_(self._file.read(lm.bias) * lm.scaling)
        return tensor

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·A, B)`` of the base weight ``name`` as float32 matrices (convolution kernels flattened), so
        that ``B·(s·A)`` is the delta in factor layout."""
        lm = self.modules[name]
        a, b = self._file.read(lm.a).float(), self._file.read(lm.b).float()
        return (a * lm.scaling).flatten(1), b.flatten(1)

    def factor_layout(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        """The stored shapes of ``A`` and ``B`` and their dtype (to store merged factors alike)."""
        lm = self.modules[name]
        info = self._file.info(lm.a)
        return tuple(info.shape), tuple(self._file.info(lm.b).shape), info.dtype

    def read(self, key: str) -> torch.Tensor:
        """A tensor of the adapter file by its stored key."""
        return self._file.read(key)

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({self.path!r}, {len(self.modules)} modules, {len(self.replacements)} saved)"
