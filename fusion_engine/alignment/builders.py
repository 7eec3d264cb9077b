"""Builders of :class:`PermutationSpec` for common architectures.

* :func:`mlp_permutation_spec` / :func:`vgg_permutation_spec` — a feed-forward chain of Linear / Conv
  layers (with biases, BatchNorm/LayerNorm, activations, pooling, one flatten): one permutation per
  hidden layer output, ``P_<module>``.
* :func:`resnet_permutation_spec` — a ResNet with ``conv1/bn1`` stem, ``layer<s>.<b>.conv<k>/bn<k>``
  blocks, an optional ``shortcut`` / ``downsample`` (conv, bn) per block and an ``fc`` head
  (torchvision naming, which :mod:`fusion_engine.alignment.models` follows). Blocks joined by an
  identity shortcut share one permutation of the residual stream, ``P_res<k>``; the inner channels
  of each block get their own, ``P_layer<s>.<b>.conv<k>``.
* :func:`transformer_permutation_spec` — GPT-2 (``transformer.h.{i}.attn.c_attn`` …, Conv1D weights
  stored ``[in, out]``) and Llama (``model.layers.{i}.self_attn.q_proj`` …) state-dict names.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from .spec import BN_STATS, AxisSlot, PermutationSpec



_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _state_dict(model_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise ConfigError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")


def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


class _SpecBuilder:
    def __init__(self, sd):
        self.shapes = _shapes(sd)
        self.sizes: dict[str, int] = {}
        self.slots: dict[str, list[AxisSlot]] = {}
        self.copies: dict[str, int] = {}
        self.sites: dict[str, list[str]] = {}
        self.head_dims: dict[str, str | None] = {}

    def perm(self, name: str, n: int, copies: int = 1):
        if name not in self.sizes:
            self.sizes[name], self.slots[name] = n, []
            if copies > 1:
                self.copies[name] = copies

    def on(self, perm: str | None, param: str, axis: int, **window):
        if perm is not None and param in self.shapes:
            self.slots[perm].append(AxisSlot(param, axis, **window))

    def site(self, perm: str, module: str):
        self.sites.setdefault(perm, []).append(module)

    def build(self) -> PermutationSpec:
        used = {s.param for slots in self.slots.values() for s in slots}
        return PermutationSpec(
            perm_sizes=dict(self.sizes), slots={p: tuple(s) for p, s in self.slots.items()},
            param_shapes={k: v for k, v in self.shapes.items() if k in used}, copies=dict(self.copies),
            activation_sites={p: tuple(m) for p, m in self.sites.items()}, head_dims=dict(self.head_dims))


# ------------------------------------------------------------------------------------------------
# feed-forward chains: MLP, VGG


def _module_prefix(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _unit_sites(model: nn.Module, layer_modules: list[str]) -> dict[str, str]:
    """layer module → the module whose output carries its units: its norm if it has one, else the layer itself
    (pre-activation values: no unit is dead, so every unit stays identifiable)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    out, current = {}, None
    for name, m in leaves:
        if name in layer_modules:
            current = name
            out[name] = name
        elif current is not None and isinstance(m, _NORMS):
            out[current] = name
    return out


def sequential_permutation_spec(model_or_state_dict) -> PermutationSpec:
    """Spec of a feed-forward chain of Linear/Conv layers, read from the state dict's order.

    Each weight with ≥ 2 dims except the last is a layer whose output units get a permutation
    ``P_<module>``; the 1-D tensors after it (its bias, a norm's weight/bias/running stats) follow that
    permutation; the next layer's input axis follows it too. A Linear after a Conv whose input is
    the flattened ``[C, H, W]`` map gets the channel permutation with ``inner = H·W``.
    """
    sd = _state_dict(model_or_state_dict)
    layer_keys = [k for k, v in sd.items() if v.dim() >= 2]
    if len(layer_keys) < 2:
        raise ConfigError("sequential_permutation_spec: need at least two Linear/Conv layers "
                          f"(found {len(layer_keys)} weights with >= 2 dims)")
    b = _SpecBuilder(sd)
    current, n_cur = None, None
    for k, v in sd.items():
        if v.dim() >= 2:
            if current is not None:
                if v.shape[1] % n_cur:
                    raise ConfigError(f"sequential_permutation_spec: {k!r} has {v.shape[1]} inputs, not a multiple "
                                      f"of the previous layer's {n_cur} outputs; is this a feed-forward chain?")
                b.on(current, k, 1, inner=v.shape[1] // n_cur)
            if k == layer_keys[-1]:
                current = None
            else:
                current, n_cur = f"P_{_module_prefix(k)}", v.shape[0]
                b.perm(current, n_cur)
                b.on(current, k, 0)
        elif v.dim() == 1 and current is not None and v.shape[0] == n_cur:
            b.on(current, k, 0)
    if isinstance(model_or_state_dict, nn.Module):
        sites = _unit_sites(model_or_state_dict, [_module_prefix(k) for k in layer_keys])
        for k in layer_keys[:-1]:
            b.site(f"P_{_module_prefix(k)}", sites.get(_module_prefix(k), _module_prefix(k)))
    return b.build()


def mlp_permutation_spec(model_or_state_dict) -> PermutationSpec:
    """Spec of an ``nn.Sequential`` of Linear layers and activations (see :func:`sequential_permutation_spec`)."""
    return sequential_permutation_spec(model_or_state_dict)


def vgg_permutation_spec(model_or_state_dict) -> PermutationSpec:
    """Spec of a VGG-style CNN: conv (+BN) layers, pooling, flatten, Linear classifier."""
    return sequential_permutation_spec(model_or_state_dict)


# ------------------------------------------------------------------------------------------------
# ResNet

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")


def resnet_permutation_spec(model_or_state_dict) -> PermutationSpec:
    """Spec of a ResNet (torchvision names: ``conv1``, ``bn1``, ``layer<s>.<b>.conv<k>``/``bn<k>``,
    ``layer<s>.<b>.shortcut.{0,1}`` or ``downsample.{0,1}``, ``fc``).

    The residual stream between two projection shortcuts carries one permutation shared by every
    block writing to it (the stem or projection shortcut, each block's last conv/bn) and reading
    from it (each block's first conv, the next shortcut conv, ``fc``).
    """
    sd = _state_dict(model_or_state_dict)
    if "conv1.weight" not in sd or not any(_BLOCK.match(k) for k in sd):
        raise ConfigError("resnet_permutation_spec: expected torchvision-style names (conv1.weight, "
                          "layer1.0.conv1.weight, …); this state dict has none")
    blocks: dict[tuple[int, int], list[str]] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            blocks.setdefault((int(m.group(1)), int(m.group(2))), []).append(m.group(3))
    b = _SpecBuilder(sd)
    n_res = 0
    res = "P_res0"
    b.perm(res, sd["conv1.weight"].shape[0])

    def norm_params(prefix: str, perm: str):
        for stat in ("weight", "bias", "running_mean", "running_var"):
            b.on(perm, f"{prefix}.{stat}", 0)

    b.on(res, "conv1.weight", 0)
    b.on(res, "conv1.bias", 0)
    norm_params("bn1", res)
    b.site(res, "bn1")
    for (s, i) in sorted(blocks):
        pre = f"layer{s}.{i}"
        names = blocks[(s, i)]
        convs = sorted({int(n[4:].split(".")[0]) for n in names if re.match(r"conv\d+\.weight$", n)})
        short = next((sc for sc in ("shortcut", "downsample") if f"{sc}.0.weight" in names), None)
        inp = res
        if short is not None:
            n_res += 1
            res = f"P_res{n_res}"
            b.perm(res, sd[f"{pre}.{short}.0.weight"].shape[0])
            b.on(res, f"{pre}.{short}.0.weight", 0)
            b.on(inp, f"{pre}.{short}.0.weight", 1)
            norm_params(f"{pre}.{short}.1", res)
            b.site(res, f"{pre}.{short}.1")
        prev = inp
        for j, c in enumerate(convs):
            w = f"{pre}.conv{c}.weight"
            out = res if j == len(convs) - 1 else f"P_{pre}.conv{c}"
            b.perm(out, sd[w].shape[0])
            b.on(out, w, 0)
            b.on(prev, w, 1)
            b.on(out, f"{pre}.conv{c}.bias", 0)
            norm_params(f"{pre}.bn{c}", out)
            b.site(out, f"{pre}.bn{c}")  # pre-activation (the residual branch, for the last conv)
            prev = out
    head = next((h for h in ("fc", "linear") if f"{h}.weight" in sd), None)
    if head is None:
        raise ConfigError("resnet_permutation_spec: no classifier 'fc.weight' (or 'linear.weight') found")
    b.on(res, f"{head}.weight", 1, inner=sd[f"{head}.weight"].shape[1] // b.sizes[res])
    return b.build()


# ------------------------------------------------------------------------------------------------
# transformers


def _find_prefix(keys, suffix_re: str) -> str | None:
    pat = re.compile(rf"^(.*?){suffix_re}$")
    for k in keys:
        m = pat.match(k)
        if m:
            return m.group(1)
    return None


def transformer_permutation_spec(model_or_state_dict, *, n_layers: int | None = None, n_heads: int | None = None,
                                 n_kv_heads: int | None = None, permute_head_dims: bool = True) -> PermutationSpec:
    """Spec of a GPT-2 or Llama decoder stack (names as in ``transformers``' state dicts).

    Permutations:

    * ``residual`` (hidden size D): the residual stream, shared by every layer — embeddings (and
      GPT-2's position embeddings), every norm's weight (and bias), the input side of Q/K/V and the
      FFN's first projections, the output side of the attention output and FFN output projections,
      the final norm and ``lm_head``. LayerNorm and RMSNorm are permutation-equivariant, so
      permuting their weights with the residual is exact.
    * ``layers.<i>.heads``: attention heads of layer i (as blocks of head_dim). With grouped-query
      attention (Llama, ``n_kv_heads < n_heads``) it permutes key/value heads, each moving its group
      of query heads along, since ``repeat_kv`` ties query head h to key/value head h // group.
    * ``layers.<i>.v_dims`` (one permutation of head_dim per key/value head): the dimensions inside
      each value head, applied to V's output and the attention output projection's input.
    * ``layers.<i>.qk_dims`` (GPT-2 only, one per head): the dimensions inside each query/key head,
      applied to Q and K alike (q·k is invariant). Llama gets none: rotary embeddings rotate
      dimension pairs (j, j + head_dim/2) at distinct frequencies, and the only permutation that
      commutes with every such rotation is the identity.
    * ``layers.<i>.ffn``: the FFN hidden units (GPT-2 ``c_fc``; Llama ``gate_proj`` and ``up_proj``
      rows together).

    Activation sites (for activation matching): each decoder layer's output (residual), the FFN
    down projection's input, and the attention output projection's input for the heads, which
    ``head_dims`` pairs with the ``v_dims`` permutation of the same layer.

    ``n_layers`` / ``n_heads`` / ``n_kv_heads`` default to a model's config (required for a bare
    state dict, except ``n_kv_heads`` which defaults to ``n_heads``). ``permute_head_dims=False``
    leaves the within-head permutations out.
    """
    model = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    sd = _state_dict(model_or_state_dict)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        n_layers = n_layers or getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        n_heads = n_heads or getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        n_kv_heads = n_kv_heads or getattr(cfg, "num_key_value_heads", None)
    if not n_layers or not n_heads:
        raise ConfigError("transformer_permutation_spec: pass n_layers and n_heads (or a model with a config)")
    n_kv_heads = n_kv_heads or n_heads
    if n_heads % n_kv_heads:
        raise ConfigError(f"transformer_permutation_spec: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    gpt2 = _find_prefix(sd, r"h\.0\.attn\.c_attn\.weight")
    llama = _find_prefix(sd, r"layers\.0\.self_attn\.q_proj\.weight")
    if gpt2 is not None:
        return _gpt2_spec(sd, gpt2, n_layers, n_heads, permute_head_dims)
    if llama is not None:
        return _llama_spec(sd, llama, n_layers, n_heads, n_kv_heads, permute_head_dims)
    raise ConfigError("transformer_permutation_spec: found neither GPT-2 names (transformer.h.0.attn.c_attn.weight) "
                      "nor Llama names (model.layers.0.self_attn.q_proj.weight)")


def _gpt2_spec(sd, pre: str, n_layers: int, n_heads: int, head_dims: bool) -> PermutationSpec:
    b = _SpecBuilder(sd)
    D = sd[f"{pre}h.0.attn.c_attn.weight"].shape[0]
    d = D // n_heads
    if d * n_heads != D:
        raise ConfigError(f"transformer_permutation_spec: hidden size {D} is not divisible by n_heads={n_heads}")
    root = pre[:-len("transformer.")] if pre.endswith("transformer.") else ""
    res = "residual"
    b.perm(res, D)
    b.on(res, f"{pre}wte.weight", 1, reads=False)
    b.on(res, f"{pre}wpe.weight", 1, reads=False)
    for i in range(n_layers):
        h = f"{pre}h.{i}."
        if f"{h}attn.c_attn.weight" not in sd:
            raise ConfigError(f"transformer_permutation_spec: {h}attn.c_attn.weight missing; is n_layers={n_layers} right?")
        for ln in ("ln_1", "ln_2"):
            b.on(res, f"{h}{ln}.weight", 0)
            b.on(res, f"{h}{ln}.bias", 0)
        qkv, qkv_b, proj = f"{h}attn.c_attn.weight", f"{h}attn.c_attn.bias", f"{h}attn.c_proj.weight"
        b.on(res, qkv, 0, reads=True)  # Conv1D weights are stored [in, out]
        b.on(res, proj, 1, reads=False)
        b.on(res, f"{h}attn.c_proj.bias", 0)
        if head_dims:
            qk, v = f"layers.{i}.qk_dims", f"layers.{i}.v_dims"
            b.perm(qk, d, n_heads)
            b.perm(v, d, n_heads)
            for start in (0, D):
                b.on(qk, qkv, 1, start=start, outer=n_heads, reads=False)
                b.on(qk, qkv_b, 0, start=start, outer=n_heads)
            b.on(v, qkv, 1, start=2 * D, outer=n_heads, reads=False)
            b.on(v, qkv_b, 0, start=2 * D, outer=n_heads)
            b.on(v, proj, 0, outer=n_heads, reads=True)
        heads = f"layers.{i}.heads"
        b.perm(heads, n_heads)
        for start in (0, D, 2 * D):
            b.on(heads, qkv, 1, start=start, inner=d, reads=False)
            b.on(heads, qkv_b, 0, start=start, inner=d)
        b.on(heads, proj, 0, inner=d, reads=True)
        b.site(heads, f"{h}attn.c_proj:input")
        b.head_dims[heads] = f"layers.{i}.v_dims" if head_dims else None
        ffn = f"layers.{i}.ffn"
        b.perm(ffn, sd[f"{h}mlp.c_fc.weight"].shape[1])
        b.on(ffn, f"{h}mlp.c_fc.weight", 1, reads=False)
        b.on(res, f"{h}mlp.c_fc.weight", 0, reads=True)
        b.on(ffn, f"{h}mlp.c_fc.bias", 0)
        b.on(ffn, f"{h}mlp.c_proj.weight", 0, reads=True)
        b.on(res, f"{h}mlp.c_proj.weight", 1, reads=False)
        b.on(res, f"{h}mlp.c_proj.bias", 0)
        b.site(res, f"{h[:-1]}")
        b.site(ffn, f"{h}mlp.c_proj:input")
    b.on(res, f"{pre}ln_f.weight", 0)
    b.on(res, f"{pre}ln_f.bias", 0)
    b.on(res, f"{root}lm_head.weight", 1)
    return b.build()


def _llama_spec(sd, pre: str, n_layers: int, n_heads: int, n_kv: int, head_dims: bool) -> PermutationSpec:
    b = _SpecBuilder(sd)
    q0 = sd[f"{pre}layers.0.self_attn.q_proj.weight"]
    D = q0.shape[1]
    d = q0.shape[0] // n_heads
    rep = n_heads // n_kv
    root = pre[:-len("model.")] if pre.endswith("model.") else ""
    res = "residual"
    b.perm(res, D)
    b.on(res, f"{pre}embed_tokens.weight", 1, reads=False)
    for i in range(n_layers):
        h = f"{pre}layers.{i}."
        a = f"{h}self_attn."
        if f"{a}q_proj.weight" not in sd:
            raise ConfigError(f"transformer_permutation_spec: {a}q_proj.weight missing; is n_layers={n_layers} right?")
        for ln in ("input_layernorm", "post_attention_layernorm"):
            b.on(res, f"{h}{ln}.weight", 0)
            b.on(res, f"{h}{ln}.bias", 0)
        for proj in ("q_proj", "k_proj", "v_proj"):
            b.on(res, f"{a}{proj}.weight", 1)
        b.on(res, f"{a}o_proj.weight", 0)
        b.on(res, f"{a}o_proj.bias", 0)
        if head_dims:
            v = f"layers.{i}.v_dims"
            b.perm(v, d, n_kv)
            b.on(v, f"{a}v_proj.weight", 0, outer=n_kv)
            b.on(v, f"{a}v_proj.bias", 0, outer=n_kv)
            b.on(v, f"{a}o_proj.weight", 1, outer=n_heads, repeat=rep)
        heads = f"layers.{i}.heads"
        b.perm(heads, n_kv)
        b.on(heads, f"{a}q_proj.weight", 0, inner=rep * d)
        b.on(heads, f"{a}q_proj.bias", 0, inner=rep * d)
        for proj in ("k_proj", "v_proj"):
            b.on(heads, f"{a}{proj}.weight", 0, inner=d)
            b.on(heads, f"{a}{proj}.bias", 0, inner=d)
        b.on(heads, f"{a}o_proj.weight", 1, inner=rep * d)
        b.site(heads, f"{a}o_proj:input")
        b.head_dims[heads] = f"layers.{i}.v_dims" if head_dims else None
        m = f"{h}mlp."
        ffn = f"layers.{i}.ffn"
        b.perm(ffn, sd[f"{m}up_proj.weight"].shape[0])
        for proj in ("gate_proj", "up_proj"):
            b.on(ffn, f"{m}{proj}.weight", 0)
            b.on(ffn, f"{m}{proj}.bias", 0)
            b.on(res, f"{m}{proj}.weight", 1)
        b.on(ffn, f"{m}down_proj.weight", 1)
        b.on(res, f"{m}down_proj.weight", 0)
        b.on(res, f"{m}down_proj.bias", 0)
        b.site(res, f"{h[:-1]}")
        b.site(ffn, f"{m}down_proj:input")
    b.on(res, f"{pre}norm.weight", 0)
    b.on(res, f"{pre}norm.bias", 0)
    b.on(res, f"{root}lm_head.weight", 1)
    return b.build()


def infer_permutation_spec(model: nn.Module) -> PermutationSpec:
    """The spec of ``model`` chosen by its structure: a transformers GPT-2/Llama model, a
    torchvision-style ResNet, or a feed-forward chain (MLP / VGG)."""
    sd = model.state_dict()
    if getattr(model, "config", None) is not None and (
            _find_prefix(sd, r"h\.0\.attn\.c_attn\.weight") is not None
            or _find_prefix(sd, r"layers\.0\.self_attn\.q_proj\.weight") is not None):
        return transformer_permutation_spec(model)
    if "conv1.weight" in sd and any(_BLOCK.match(k) for k in sd):
        return resnet_permutation_spec(model)
    return sequential_permutation_spec(model)


__all__ = ["sequential_permutation_spec", "mlp_permutation_spec", "vgg_permutation_spec",
           "resnet_permutation_spec", "transformer_permutation_spec", "infer_permutation_spec", "BN_STATS"]
