"""``fusion-engine extract-lora``: a PEFT LoRA adapter approximating ``model − base`` (mergekit-extract-lora).

For every weight of a decomposable module (linear layers including ``lm_head``, convolutions, and
embeddings with ``embed_lora``) the delta ``Δ = W_model − W_base`` is replaced by its best rank-``k``
approximation (:mod:`fusion_engine.lora.svd`), ``k ≤ max_rank`` and only singular values
``> sv_epsilon``, stored as PEFT factors with scaling 1:

* linear ``out × in``: ``B = U√S`` (``out × k``), ``A = √S Vᵀ`` (``k × in``);
* convolution ``out × in × k…``: the same on ``Δ`` flattened to ``out × (in·k…)``, ``A`` reshaped to a
  ``k × in × k…`` kernel and ``B`` to ``out × k × 1…`` (PEFT's conv LoRA);
* embedding ``vocab × dim`` (``embed_lora``): PEFT's ``Δ = (B·A)ᵀ``, so ``Δᵀ`` is decomposed into
  ``lora_embedding_B`` (``dim × k``) and ``lora_embedding_A`` (``k × vocab``).

mergekit's conventions, so the adapters are interchangeable: embeddings, norms and anything else that
is not a matrix are stored whole in ``modules_to_save`` (embeddings: unless ``embed_lora``; the rest:
unless ``skip_undecomposable``, which drops them), modules named in ``modules_to_save`` are stored
whole, ``r`` is the largest rank kept with ``lora_alpha = r``, and the modules of other ranks are listed
in ``rank_pattern`` and ``alpha_pattern`` (so every module's scaling is 1). A module whose delta is
zero is left out. A changed bias of a decomposed module becomes ``lora_B.bias`` (``lora_bias``) when
every decomposed module kept has a bias, else (and when the weight did not change) its module is
stored whole.

The model is streamed: one pass reads base and model tensors and decomposes deltas (stacked by shape,
up to ``batch_bytes`` at a time, on ``device``); a second pass copies the whole modules into the
adapter file. Only the factors (rank × (m + n) per module) stay in memory. Per module the report gives
the rank kept and the fraction of the delta's energy kept, ``Σ_{i≤k} σ_i² / ‖Δ‖_F²``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, ConfigError
from ..io.atomic import check_output_dir
from .adapter import PEFT_PREFIX
from .reference import open_model
from .save import rank_config, write_adapter
from .svd import kept_rank, lora_factors, truncated_svd

EMBEDDING_HINTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_in", "embed_positions", "shared")
DEFAULT_BATCH_BYTES = 256 * 2**20


@dataclass
class ModuleReport:
    """What extraction did with one module: ``kind`` is ``lora``, ``lora_embedding`` or ``saved``."""

    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int = 0
    energy_kept: float = 1.0


@dataclass
class _Decomposition:
    module: str
    shape: tuple[int, ...]
    embedding: bool
    dtype: torch.dtype
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    rank: int = 0
    energy: float = 1.0
    bias_delta: torch.Tensor | None = None
    has_bias: bool = False


@dataclass
class _Plan:
    decompose: dict[str, _Decomposition] = field(default_factory=dict)  # module -> decomposition
    whole: dict[str, list[str]] = field(default_factory=dict)  # module -> its tensor names in the model


def is_embedding(module: str) -> bool:
    """An input embedding by name (the last part of the module path)."""
    return module.rsplit(".", 1)[-1] in EMBEDDING_HINTS


def _matches(module: str, names) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def _modules(names: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        out.setdefault(module, {})[param] = name
    return out


class _Extractor:
    def __init__(self, model, base, *, max_rank, sv_epsilon, modules_to_save, embed_lora, skip_undecomposable,
                 distribute_scale, include_regexes, exclude_regexes, device, batch_bytes):
        self.model, self.base = model, base
        self.max_rank, self.sv_epsilon = max_rank, sv_epsilon
        self.modules_to_save = list(modules_to_save)
        self.embed_lora, self.skip_undecomposable = embed_lora, skip_undecomposable
        self.distribute_scale = distribute_scale
        self.include, self.exclude = list(include_regexes), list(exclude_regexes)
        self.device, self.batch_bytes = device, batch_bytes
        self.plan = _Plan()
        self._pending: dict[tuple, list[tuple[_Decomposition, torch.Tensor]]] = {}
        self._pending_bytes = 0

    # ------------------------------------------------------------------ classification
    def classify(self) -> None:
        base_names = set(self.base.names())
        for module, params in _modules(self.model.names()).items():
            if _matches(module, self.modules_to_save):
                self.plan.whole[module] = list(params.values())
                continue
            if self.include and not any(re.search(r, module) for r in self.include):
                continue
            if any(re.search(r, module) for r in self.exclude):
                continue
            weight = params.get("weight")
            info = self.model.info(weight) if weight else None
            same = weight in base_names and tuple(self.base.info(weight).shape) == tuple(info.shape) if info else False
            embedding = info is not None and len(info.shape) == 2 and is_embedding(module)
            if info is not None and len(info.shape) >= 2 and same and (self.embed_lora or not embedding) \
                    and set(params) <= {"weight", "bias"}:
                self.plan.decompose[module] = _Decomposition(module, tuple(info.shape), embedding, info.dtype,
                                                             has_bias="bias" in params)
            elif embedding or (info is not None and len(info.shape) >= 2) or not self.skip_undecomposable:
                self.plan.whole[module] = list(params.values())  # embeddings, vocab changes, norms, ...

    # ------------------------------------------------------------------ decomposition
    def run(self) -> None:
        for module, dec in self.plan.decompose.items():
            w = f"{module}.weight"
            delta = (self.model.read(w).to(self.device, torch.float32)
                     - self.base.read(w).to(self.device, torch.float32))
            if dec.has_bias:
                bias = f"{module}.bias"
                dec.bias_delta = (self.model.read(bias).float() - self.base.read(bias).float()) \
                    if bias in self.base else self.model.read(bias).float()
            matrix = delta.T if dec.embedding else delta.reshape(delta.shape[0], -1)
            key = tuple(matrix.shape)
            self._pending.setdefault(key, []).append((dec, matrix))
            self._pending_bytes += matrix.numel() * 4
            if self._pending_bytes > self.batch_bytes:
                self._flush(max(self._pending, key=lambda k: len(self._pending[k]) * k[0] * k[1]))
        for key in list(self._pending):
            self._flush(key)

    def _flush(self, key: tuple) -> None:
        items = self._pending.pop(key)
        self._pending_bytes -= sum(m.numel() * 4 for _, m in items)
        decs = [d for d, _ in items]
        stack = torch.stack([m for _, m in items])
        items.clear()
        energy = stack.square().sum(dim=(1, 2))
        u, s, vh = truncated_svd(stack, self.max_rank)
        del stack
        for i, dec in enumerate(decs):
            dec.rank = kept_rank(s[i], self.max_rank, self.sv_epsilon)
            total = float(energy[i])
            dec.energy = float(s[i, :dec.rank].square().sum()) / total if total > 0 else 1.0
            if dec.rank == 0:
                continue
            a, b = lora_factors(u[i], s[i], vh[i], dec.rank, self.distribute_scale)
            if not dec.embedding and len(dec.shape) > 2:  # convolution: A a kernel, B a 1×1… kernel
                a = a.reshape(dec.rank, *dec.shape[1:])
                b = b.reshape(dec.shape[0], dec.rank, *([1] * (len(dec.shape) - 2)))
            dtype = dec.dtype if dec.dtype.is_floating_point else torch.float32
            dec.a, dec.b = a.to("cpu", dtype).contiguous(), b.to("cpu", dtype).contiguous()

    def settle_biases(self) -> bool:
        """``lora_bias`` when some bias changed and every decomposed module kept has a bias (PEFT adds
        ``s·lora_B.bias`` to each); modules whose changed bias no factor can carry are stored whole."""
        changed = [d for d in self.plan.decompose.values() if d.bias_delta is not None and bool(d.bias_delta.any())]
        kept = [d for d in self.plan.decompose.values() if d.rank > 0]
        lora_bias = all(d.has_bias and not d.embedding for d in kept)
        for dec in changed:
            if not lora_bias or dec.rank == 0:
                del self.plan.decompose[dec.module]
                self.plan.whole[dec.module] = [f"{dec.module}.weight", f"{dec.module}.bias"]
        return lora_bias and any(d.rank > 0 for d in changed)

    # ------------------------------------------------------------------ output
    def tensors(self, lora_bias: bool) -> list[tuple[str, object]]:
        """[(adapter key, tensor or model tensor name)] in the model's order."""
        out: list[tuple[str, object]] = []
        for module, dec in self.plan.decompose.items():
            if dec.rank == 0:
                continue
            if dec.embedding:
                out += [(f"{PEFT_PREFIX}{module}.lora_embedding_A", dec.a),
                        (f"{PEFT_PREFIX}{module}.lora_embedding_B", dec.b)]
                continue
            out += [(f"{PEFT_PREFIX}{module}.lora_A.weight", dec.a), (f"{PEFT_PREFIX}{module}.lora_B.weight", dec.b)]
            if lora_bias:
                out.append((f"{PEFT_PREFIX}{module}.lora_B.bias", dec.bias_delta.to(dec.dtype)))
        for module, names in self.plan.whole.items():
            out += [(f"{PEFT_PREFIX}{name}", name) for name in names]
        return out

    def reports(self) -> list[ModuleReport]:
        out = [ModuleReport(m, "lora_embedding" if d.embedding else "lora", d.shape, d.rank, d.energy)
               for m, d in self.plan.decompose.items()]
        out += [ModuleReport(m, "saved", tuple(self.model.info(names[0]).shape)) for m, names in self.plan.whole.items()]
        return out

    def adapter_config(self, base_ref: str, lora_bias: bool) -> dict:
        ranks = {m: d.rank for m, d in self.plan.decompose.items() if d.rank > 0}
        if not ranks:
            raise CheckpointError("no weight differs between the model and the base (every delta is zero, or below "
                                  "--sv-epsilon): there is nothing to extract")
        saved = list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in self.plan.whole))
        return {"base_model_name_or_path": base_ref, "peft_type": "LORA", "task_type": "CAUSAL_LM",
                **rank_config(ranks), "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
                "modules_to_save": saved or None, "lora_dropout": 0.0, "fan_in_fan_out": False,
                "lora_bias": lora_bias, "bias": "none", "inference_mode": True}


def extract_lora(model: str, base_model: str, out_path: str, *, max_rank: int = 128, sv_epsilon: float = 0.0,
                 modules_to_save=(), embed_lora: bool = False, skip_undecomposable: bool = False,
                 distribute_scale: bool = True, include_regexes=(), exclude_regexes=(),
                 device: str | torch.device = "cpu", batch_bytes: int = DEFAULT_BATCH_BYTES,
                 allow_overwrite: bool = False) -> list[ModuleReport]:
    """Write a PEFT LoRA adapter folder ``out_path`` with ``base_model + adapter ≈ model`` (see the module doc).

    ``model`` and ``base_model`` are local checkpoints (or ``BASE+ADAPTER`` references). Returns one
    :class:`ModuleReport` per module written. The folder appears only when complete.

    Example::

        reports = extract_lora("./finetuned", "./base", "./adapter", max_rank=16)
        # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("./base"), "./adapter")
    """
    if max_rank < 1:
        raise ConfigError(f"--max-rank must be >= 1, got {max_rank}")
    if sv_epsilon < 0:
        raise ConfigError(f"--sv-epsilon must be >= 0, got {sv_epsilon}")
    check_output_dir(out_path, allow_overwrite)  # before any SVD
    device = torch.device(device)
    with open_model(model) as mdl, open_model(base_model) as base:
        ex = _Extractor(mdl, base, max_rank=max_rank, sv_epsilon=sv_epsilon, modules_to_save=modules_to_save,
                        embed_lora=embed_lora, skip_undecomposable=skip_undecomposable,
                        distribute_scale=distribute_scale, include_regexes=include_regexes,
                        exclude_regexes=exclude_regexes, device=device, batch_bytes=batch_bytes)
        ex.classify()
        ex.run()
        lora_bias = ex.settle_biases()
        config = ex.adapter_config(os.path.abspath(base_model), lora_bias)
        write_adapter(out_path, ex.tensors(lora_bias), config, source=mdl, allow_overwrite=allow_overwrite)
        return ex.reports()


def format_reports(reports: list[ModuleReport]) -> str:
    """One line per module: kind, rank and the energy kept, then a total."""
    lines = []
    for r in reports:
        if r.kind == "saved":
            lines.append(f"  {r.module:48s} saved whole {list(r.shape)}")
        else:
            lines.append(f"  {r.module:48s} {r.kind:15s} rank {r.rank:4d}  energy kept {r.energy_kept:8.4%}")
    lora = [r for r in reports if r.kind != "saved"]
    if lora:
        worst = min(lora, key=lambda r: r.energy_kept)
        lines.append(f"{len(lora)} modules decomposed (lowest energy kept {worst.energy_kept:.4%} in {worst.module}), "
                     f"{len(reports) - len(lora)} saved whole")
    return "\n".join(lines)
