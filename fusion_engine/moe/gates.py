"""Router (gate) weights of an MoE built from dense experts, by mergekit-moe's rules.

For ``L`` layers, ``E`` experts (plus shared experts that have prompts) and hidden size ``H`` the
result is ``G ∈ R^{L×E×H}``; row ``G[l, e]`` is the router weight of expert ``e`` at layer ``l``
(the router computes logits ``G[l] · h``). ``mergekit.moe.router.get_gate_params``:

* ``random``: ``G ~ N(0, 1)`` (``torch.randn``; with a seed, the draw mergekit makes after
  ``--random-seed``); ``uniform_random``: ``U(-1/√H, 1/√H)``, ``nn.Linear``'s default init.
* ``cheap_embed``: for a prompt set ``P`` (each prompt prefixed with the BOS token),
  ``v(P) = s / ‖s‖`` with ``s = Σ_{p∈P} Σ_{t∈p} E[t]`` (token embeddings, fp32), the same for every layer.
* ``hidden``: ``v_l(P) = mean_{p∈P} h_l(p)[last token]``, the base model's hidden state at the input of
  layer ``l`` (``hidden_avg``: the mean over the padded sequence instead of the last token), from one
  batched forward per prompt set, left-padded with BOS as mergekit does, in ``dtype`` (bfloat16 by
  default, as mergekit loads the model).

Then ``g_e = v(P⁺_e) − v(P⁻_e)`` (no negative prompts: ``v(P⁺_e)``) and ``G[l, e] = g_e,l / max(‖g_e,l‖, 1e-8)``.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .config import Expert


def load_gate_tokenizer(path: str):
    """The base model's tokenizer as mergekit-moe sets it up: left padding, BOS as the pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base_model {path}: no usable tokenizer ({exc}); prompt-based gates need one "
                          f"(fix: add the tokenizer files, or use gate_mode: random)") from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(prompts: list[str], tokenizer):
    """``BOS + prompt`` for every prompt, padded into one batch (mergekit's ``tokenize_prompts``)."""
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def random_gates(num_layers: int, num_experts: int, hidden: int, mode: str, seed: int | None) -> torch.Tensor:
    """``randn`` (mode ``random``) or ``nn.Linear``-style uniform gates of shape [L, E, H]."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (num_layers, num_experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def cheap_embedding(embed: torch.Tensor, batch, num_layers: int) -> torch.Tensor:
    """Normalised sum of the prompts' token embeddings (padding masked), repeated per layer: [L, H]."""
    h = embed.float()[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)
    summed = h.sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)


def hidden_states(model, batch, average: bool) -> torch.Tensor:
    """Hidden state at each layer's input, averaged over the prompts: [L, H] (last token, or sequence mean)."""
    with torch.no_grad():
        out = model(**batch.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # [L, B, T, H]
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def prompt_gates(experts: list[Expert], tokenizer, vector) -> torch.Tensor:
    """[L, E, H] from ``vector(batch) -> [L, H]``: positive minus negative prompts, normalised per layer."""
    gates = []
    for expert in experts:
        g = vector(tokenize_prompts(expert.positive_prompts, tokenizer))
        if expert.negative_prompts:
            g -= vector(tokenize_prompts(expert.negative_prompts, tokenizer))
        g /= g.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        gates.append(g)
    return torch.stack(gates, dim=0).permute(1, 0, 2)


def gate_vectors(mode: str, experts: list[Expert], *, base_path: str, base_ckpt, model_config, tokenizer=None,
                 device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int | None = None) -> torch.Tensor:
    """Router weights [L, len(experts), H] for ``mode`` (see the module docstring)."""
    num_layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    if mode in ("random", "uniform_random"):
        return random_gates(num_layers, len(experts), hidden, mode, seed)
    if mode == "cheap_embed":
        embed = base_ckpt.load("model.embed_tokens.weight")
        return prompt_gates(experts, tokenizer, lambda batch: cheap_embedding(embed, batch, num_layers))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
    try:
        return prompt_gates(experts, tokenizer, lambda batch: hidden_states(model, batch, mode == "hidden_avg"))
    finally:
        del model
