"""``fusion-engine moe``: assemble a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense experts.

mergekit-moe's construction (``mergekit.moe.mixtral/qwen/qwen3``), streamed layer by layer:

* every tensor outside the MLPs (embeddings, attention, norms, LM head) is the base model's;
* expert ``e``'s MLP at layer ``l`` is model ``e``'s ``gate_proj`` / ``up_proj`` / ``down_proj``
  (Mixtral's w1 / w3 / w2), written in the layout transformers 5 models hold:
  ``model.layers.l.mlp.experts.gate_up_proj`` = ``stack_e(cat(gate_e, up_e))`` [E, 2I, H] and
  ``model.layers.l.mlp.experts.down_proj`` = ``stack_e(down_e)`` [E, H, I] (what mergekit 0.1.5
  writes for Mixtral and Qwen3-MoE; for Qwen2-MoE mergekit writes per-expert tensors that transformers
  fuses on load, we write the fused tensors directly);
* ``model.layers.l.mlp.gate.weight`` [E, H] is the router, from :mod:`fusion_engine.moe.gates`;
* Qwen2-MoE adds the shared expert (``mlp.shared_expert.*_proj.weight``, its gate
  ``mlp.shared_expert_gate.weight`` [1, H]) and zero q/k/v biases when the base has none.

``residual_scale`` multiplies an expert's down projection (in its stored dtype, before the cast to the
output dtype, as mergekit does). ``noise_scale`` adds ``N(0, noise_scale²)`` noise drawn from a
generator keyed by ``seed`` and the tensor name (mergekit draws from the global generator in its write
order, so noisy experts are reproducible here but not mergekit's draw). The output (config.json, the
tokenizer as mergekit saves it, sharded safetensors, ``mergekit_moe_config.yml``) is built beside
``out_dir`` and renamed into place when complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from ..checkpoint.config import DTYPES
from ..errors import CheckpointError, ConfigError, MissingTensorError, ShapeMismatchError
from ..io import ShardedWriter, atomic_output_dir, open_checkpoint, parse_size
from ..io.writer import write_file_synced
from ..ops import stream_id
from .config import Expert, MoEConfig, check_moe_config, load_moe_config
from .gates import gate_vectors, load_gate_tokenizer

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class OutputArchitecture:
    """One MoE output format: its name (``architecture:`` matches a prefix), accepted input model types,
    whether it takes a shared expert, and its transformers config class."""

    name: str
    model_types: tuple[str, ...]
    shared_experts: int  # how many shared experts it needs (0 or 1)
    config_class: str
    architecture: str

    def why_not(self, config: MoEConfig, model_types: list[str]) -> str | None:
        """None when this format can build ``config``; else the reason (mergekit's ``supports_config``)."""
        if len(config.shared_experts) != self.shared_experts:
            return (f"{self.name} needs exactly one shared expert" if self.shared_experts
                    else f"{self.name} does not support shared experts")
        if self.shared_experts and config.gate_mode != "random" and not config.shared_experts[0].positive_prompts:
            return f"{self.name} needs positive_prompts for the shared expert"
        if len(set(model_types)) != 1:
            return f"{self.name} needs every input model to have the same architecture, got {sorted(set(model_types))}"
        if any(t not in self.model_types for t in model_types):
            return f"{self.name} takes {' / '.join(self.model_types)} models, got {sorted(set(model_types))}"
        return None


ARCHITECTURES = (
    OutputArchitecture("Mixtral", ("llama", "mistral"), 0, "MixtralConfig", "MixtralForCausalLM"),
    OutputArchitecture("Qwen MoE", ("llama", "mistral", "qwen2"), 1, "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    OutputArchitecture("Qwen3 MoE", ("qwen3",), 0, "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
)


def select_architecture(config: MoEConfig, model_types: list[str]) -> OutputArchitecture:
    """mergekit-moe's ``select_output_arch``: the formats whose name starts with ``architecture`` (all when
    unset) that support the config; Mixtral when it is among them, else the first."""
    wanted = config.architecture.lower() if config.architecture else ""
    candidates = [a for a in ARCHITECTURES if a.name.lower().startswith(wanted)]
    if not candidates:
        hint = (" (DeepSeek-MoE output needs remote code and is not supported; use architecture: qwen for a "
                "shared expert)" if wanted.startswith("deepseek") else "")
        raise config.error("architecture", f"no output architecture matches {config.architecture!r}{hint}",
                           f"use one of {', '.join(a.name for a in ARCHITECTURES)}")
    reasons = [(a, a.why_not(config, model_types)) for a in candidates]
    usable = [a for a, why in reasons if why is None]
    if not usable:
        raise config.error("architecture" if config.architecture else "experts",
                           "no output architecture can build this MoE: " + "; ".join(w for _, w in reasons),
                           "Mixtral and Qwen3-MoE take no shared experts, Qwen2-MoE exactly one")
    return next((a for a in usable if a.name == "Mixtral"), usable[0])


def output_config(arch: OutputArchitecture, base_cfg, num_experts: int, experts_per_token: int, out_dtype):
    """The transformers config of the output, built from the base's exactly as mergekit-moe builds it."""
    import transformers

    if arch.name == "Mixtral":
        if not isinstance(base_cfg, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_cfg.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_cfg.max_position_embeddings
            base_cfg = mistral
        out = transformers.MixtralConfig(**base_cfg.to_dict())
        out.num_local_experts = num_experts
        out.sliding_window = None
    else:
        out = getattr(transformers, arch.config_class)(**base_cfg.to_dict())
        out.num_experts = num_experts
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.moe_intermediate_size = out.intermediate_size
        if arch.name == "Qwen MoE":
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
    out.architectures = [arch.architecture]
    out.num_experts_per_tok = experts_per_token or 2
    if out_dtype is not None:
        out.dtype = out_dtype
    return out


def _dtype_of(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value).removeprefix("torch."))


@dataclass
class _Sources:
    """Open checkpoints and what the layout needs: base config, layer count, MLP shapes."""

    config: MoEConfig
    ckpts: dict = field(default_factory=dict)

    def ckpt(self, model: str):
        if model not in self.ckpts:
            self.ckpts[model] = open_checkpoint(model)
        return self.ckpts[model]

    def close(self) -> None:
        for ck in self.ckpts.values():
            ck.close()


def _mlp_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def _check_experts(sources: _Sources, experts: list[Expert], num_layers: int) -> None:
    """Every expert model has every layer's MLP with the base's shapes (headers only)."""
    base = sources.ckpt(sources.config.base_model)
    for expert in experts:
        ck = sources.ckpt(expert.source_model)
        for layer in range(num_layers):
            for part in MLP_PARTS:
                name = _mlp_name(layer, part)
                if name not in ck:
                    raise MissingTensorError(f"expert model {expert.source_model}: no tensor {name!r} (every expert "
                                             f"needs the base's {num_layers} layers of gate/up/down projections)")
                if name in base and ck.info(name).shape != base.info(name).shape:
                    raise ShapeMismatchError(f"expert model {expert.source_model}: {name} has shape "
                                             f"{list(ck.info(name).shape)}, the base's is {list(base.info(name).shape)}"
                                             f" (experts must share the base's architecture and sizes)")


def _expert_tensor(sources: _Sources, expert: Expert, name: str, out_dtype, seed: int) -> torch.Tensor:
    """One MLP weight of ``expert`` with its noise and residual scale (mergekit's ``noise_and_scale``)."""
    tensor = sources.ckpt(expert.source_model).read(name)
    if expert.noise_scale is not None:
        g = torch.Generator().manual_seed((seed << 32) ^ stream_id(f"{expert.source_model}:{name}"))
        tensor = tensor + torch.randn(tensor.shape, generator=g).to(tensor.dtype) * expert.noise_scale
    if name.endswith("down_proj.weight") and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor.to(out_dtype) if out_dtype is not None else tensor


def build_moe(config: MoEConfig | str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "cpu",
              gate_dtype: torch.dtype = torch.bfloat16, seed: int | None = None, allow_all_same: bool = False,
              allow_overwrite: bool = False, out_shard_size: str | int = "5GB") -> dict:
    """Build the MoE that ``config`` (a mergekit-moe YAML path or a parsed :class:`MoEConfig`) describes into
    ``out_dir``. Returns a summary: architecture, tensors, bytes, seconds."""
    import transformers

    start = time.perf_counter()
    if not isinstance(config, MoEConfig):
        config = load_moe_config(config)
    check_moe_config(config, allow_all_same)
    sources = _Sources(config)
    try:
        model_types = []
        for model in [config.base_model] + [e.source_model for e in config.experts + config.shared_experts]:
            cfg = sources.ckpt(model).config()
            if cfg is None or "model_type" not in cfg:
                raise CheckpointError(f"{model}: no config.json with a model_type beside the weights")
            model_types.append(cfg["model_type"])
        arch = select_architecture(config, model_types)
        base_cfg = transformers.AutoConfig.from_pretrained(config.base_model)
        out_dtype = config.dtype or _dtype_of(getattr(base_cfg, "dtype", None))
        out_cfg = output_config(arch, base_cfg, len(config.experts), config.experts_per_token, out_dtype)
        num_layers = base_cfg.num_hidden_layers
        _check_experts(sources, config.experts + config.shared_experts, num_layers)

        need_gates = list(config.experts)
        has_shared_prompts = any(e.positive_prompts for e in config.shared_experts)
        if config.shared_experts and any(bool(e.positive_prompts) != has_shared_prompts for e in config.shared_experts):
            raise config.error("shared_experts", "some shared experts have prompts and some do not",
                               "give prompts to all shared experts or to none")
        if has_shared_prompts or config.gate_mode in ("random", "uniform_random"):
            need_gates += config.shared_experts
        prompt_mode = config.gate_mode not in ("random", "uniform_random")
        tokenizer = load_gate_tokenizer(config.base_model) if prompt_mode else _optional_tokenizer(config.base_model)
        gates = gate_vectors(config.gate_mode, need_gates, base_path=config.base_model,
                             base_ckpt=sources.ckpt(config.base_model), model_config=base_cfg, tokenizer=tokenizer,
                             device=device, dtype=gate_dtype, seed=seed).cpu()
        routers, shared_routers = gates[:, :len(config.experts)], gates[:, len(config.experts):]

        entries, producers = _plan(sources, arch, out_cfg, out_dtype, routers, shared_routers, seed or 0)
        with atomic_output_dir(out_dir, allow_overwrite) as tmp:
            out_cfg.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            with ShardedWriter.for_tensors(tmp, entries, parse_size(out_shard_size)) as writer:
                for name, produce in producers:
                    writer.add(name, produce().contiguous())
                writer.finish()
                nbytes = writer.layout.total_bytes
            if config.text:
                write_file_synced(os.path.join(tmp, "mergekit_moe_config.yml"), config.text.encode())
    finally:
        sources.close()
    return {"architecture": arch.architecture, "tensors": len(entries), "experts": len(config.experts),
            "bytes": nbytes, "seconds": time.perf_counter() - start,
            "out_dir": os.path.abspath(out_dir)}


def _optional_tokenizer(path: str):
    try:
        return load_gate_tokenizer(path)
    except ConfigError:
        return None


def _plan(sources: _Sources, arch: OutputArchitecture, out_cfg, out_dtype, routers, shared_routers, seed: int):
    """[(name, dtype, shape)] for the writer and [(name, () -> tensor)] in write order."""
    config = sources.config
    base = sources.ckpt(config.base_model)
    entries, producers = [], []

    def add(name, dtype, shape, produce):
        entries.append((name, dtype, tuple(shape)))
        producers.append((name, produce))

    for name in base.names():
        if ".mlp." in name:
            continue
        info = base.info(name)
        add(name, out_dtype or info.dtype, info.shape,
            lambda name=name: base.read(name).to(out_dtype) if out_dtype else base.read(name))
    if arch.name == "Qwen MoE":
        head_dim = out_cfg.hidden_size // out_cfg.num_attention_heads
        for layer in range(out_cfg.num_hidden_layers):
            for proj, heads in (("q_proj", out_cfg.num_attention_heads), ("k_proj", out_cfg.num_key_value_heads),
                                ("v_proj", out_cfg.num_key_value_heads)):
                name = f"model.layers.{layer}.self_attn.{proj}.bias"
                if name not in base:  # Qwen2-MoE has q/k/v biases; a Llama base has none: zeros
                    dtype = out_dtype or torch.float32
                    add(name, dtype, (heads * head_dim,), lambda n=heads * head_dim, d=dtype: torch.zeros(n, dtype=d))

    experts = config.experts
    for layer in range(out_cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        gate_info, down_info = base.info(_mlp_name(layer, "gate_proj")), base.info(_mlp_name(layer, "down_proj"))
        dtype = out_dtype or gate_info.dtype
        inter, hidden = gate_info.shape

        def gate_up(layer=layer):
            return torch.stack([torch.cat([_expert_tensor(sources, e, _mlp_name(layer, p), out_dtype, seed)
                                           for p in ("gate_proj", "up_proj")]) for e in experts])

        def down(layer=layer):
            return torch.stack([_expert_tensor(sources, e, _mlp_name(layer, "down_proj"), out_dtype, seed)
                                for e in experts])

        add(f"{prefix}.experts.gate_up_proj", dtype, (len(experts), 2 * inter, hidden), gate_up)
        add(f"{prefix}.experts.down_proj", out_dtype or down_info.dtype, (len(experts),) + tuple(down_info.shape),
            down)
        for shared in config.shared_experts:
            for part in MLP_PARTS:
                info = base.info(_mlp_name(layer, part))
                add(f"{prefix}.shared_expert.{part}.weight", out_dtype or info.dtype, info.shape,
                    lambda s=shared, n=_mlp_name(layer, part): _expert_tensor(sources, s, n, out_dtype, seed))
        router_dtype = out_dtype or routers.dtype
        add(f"{prefix}.gate.weight", router_dtype, routers.shape[1:],
            lambda w=routers[layer]: w.to(router_dtype))
        if config.shared_experts:
            add(f"{prefix}.shared_expert_gate.weight", router_dtype, shared_routers.shape[1:],
                lambda w=shared_routers[layer]: w.to(router_dtype))
    return entries, producers
