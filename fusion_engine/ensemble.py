"""Output ensembles: mean, weighted, vote and max over K models, batched when the architectures match.

Models that share one architecture (same module tree, hyper-parameters and parameter shapes) run as
one batched forward: their parameters are stacked with ``torch.func.stack_module_state`` and the
forward is ``torch.func.vmap``-ed over the model axis. Other models run one after another. Both paths
compute the same outputs; ``batched=False`` forces the loop.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .errors import ConfigError

MODES = ("mean", "weighted", "vote", "max")


def architecture_key(model: nn.Module) -> tuple:
    """What must match for two models to run in one vmapped forward: class, module tree and its
    hyper-parameters (``repr``), and every parameter's and buffer's name, shape, dtype and device."""
    tensors = [(kind, name, tuple(t.shape), t.dtype, t.device)
               for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers()))
               for name, t in named]
    return (type(model), repr(model), tuple(tensors))


class Ensemble(nn.Module):
    """Combine the outputs of K models.

    With f_i(x) the output of model i (e.g. logits [batch, classes]):

    * ``"mean"``:     y = (1/K) Σ_i f_i(x)                        (logit averaging)
    * ``"weighted"``: y = Σ_i w_i f_i(x) / Σ_i w_i                (``weights`` required)
    * ``"vote"``:     y_c = Σ_i w_i [argmax f_i(x) = c] / Σ_i w_i  (fraction of votes per class over the
      last dimension; w_i = 1 without weights; ``y.argmax(-1)`` is the majority class, ties → lowest class)
    * ``"max"``:      y = max_i f_i(x)                            (element-wise; per class the most confident model)

    Parameters
    ----------
    models : K ``nn.Module`` (same output shape)
    mode : one of ``"mean"``, ``"weighted"``, ``"vote"``, ``"max"``
    weights : K non-negative floats (``"weighted"``: required; ``"vote"``: optional vote weights)
    batched : ``"auto"`` (vmap models of the same architecture when none is in training mode — training
        mode may update buffers or draw dropout masks inside the forward), or ``False`` (always loop)

    The stacked parameters of a vmapped group are cached and rebuilt whenever any member's tensors change
    (in-place updates bump their version counters), so the ensemble always sees the current weights.
    Gradients do not flow back into the members through the vmapped path; train members separately.

    Example
    -------
    >>> ens = Ensemble([model_a, model_b, model_c], mode="vote")
    >>> predicted = ens(x).argmax(-1)

    Reference: Dietterich, "Ensemble Methods in Machine Learning", MCS 2000; Li et al., "Deep Model
    Fusion: A Survey", 2023, §5.
    """

    def __init__(self, models: Sequence[nn.Module], mode: str = "mean", weights=None, *, batched="auto"):
        super().__init__()
        if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
            raise ConfigError("Ensemble: pass a list of models, not a single nn.Module")
        models = list(models)
        if not models:
            raise ConfigError("Ensemble: pass at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise ConfigError(f"Ensemble: models[{i}] is a {type(m).__name__}, not an nn.Module")
        if mode not in MODES:
            raise ConfigError(f"Ensemble: mode={mode!r}; choose one of {', '.join(MODES)}")
        if batched not in ("auto", False):
            raise ConfigError(f"Ensemble: batched={batched!r}; pass 'auto' or False")
        self.models = nn.ModuleList(models)
        self.mode = mode
        self.batched = batched
        self.weights = self._check_weights(weights, len(models), mode)
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(models):
            groups.setdefault(architecture_key(m), []).append(i)
        self.groups = list(groups.values())  # indices of models sharing an architecture, in input order
        self._stacked: dict[int, tuple[tuple, dict, dict]] = {}

    @staticmethod
    def _check_weights(weights, k: int, mode: str) -> list[float] | None:
        if weights is None:
            if mode == "weighted":
                raise ConfigError("Ensemble: mode='weighted' needs weights (one non-negative float per model)")
            return None
        if mode in ("mean", "max"):
            raise ConfigError(f"Ensemble: mode={mode!r} takes no weights; use mode='weighted' or 'vote'")
        weights = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
        if len(weights) != k:
            raise ConfigError(f"Ensemble: {len(weights)} weights for {k} models; pass one per model")
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"Ensemble: weights={weights} must be non-negative with a positive sum")
        return weights

    # -- forward ------------------------------------------------------------------------------------

    def member_outputs(self, *args, **kwargs) -> torch.Tensor:
        """The K members' outputs stacked on a new first axis: [K, *output shape], in input order."""
        outputs: list[torch.Tensor | None] = [None] * len(self.models)
        for g, group in enumerate(self.groups):
            if self._use_vmap(group):
                stacked = self._group_output(g, group, args, kwargs)
                for j, i in enumerate(group):
                    outputs[i] = stacked[j]
            else:
                for i in group:
                    outputs[i] = self.models[i](*args, **kwargs)
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) > 1:
            raise ConfigError(f"Ensemble: the models' outputs have different shapes {sorted(shapes)}; an ensemble "
                              f"needs one output shape")
        return torch.stack(outputs)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.combine(self.member_outputs(*args, **kwargs))

    def combine(self, outputs: torch.Tensor) -> torch.Tensor:
        """Combine stacked member outputs [K, ...] with this ensemble's mode and weights."""
        if self.mode == "mean":
            return outputs.mean(0)
        if self.mode == "max":
            return outputs.amax(0)
        w = torch.tensor(self.weights if self.weights is not None else [1.0] * outputs.shape[0],
                         dtype=outputs.dtype if outputs.is_floating_point() else torch.float32, device=outputs.device)
        w = w / w.sum()
        if self.mode == "weighted":
            return torch.tensordot(w, outputs, dims=1)
        votes = torch.nn.functional.one_hot(outputs.argmax(-1), outputs.shape[-1]).to(w.dtype)  # [K, ..., C]
        return torch.tensordot(w, votes, dims=1)

    # -- the batched path ---------------------------------------------------------------------------

    def _use_vmap(self, group: list[int]) -> bool:
        return (self.batched == "auto" and len(group) > 1
                and not any(m.training for i in group for m in self.models[i].modules()))

    def _group_output(self, g: int, group: list[int], args, kwargs) -> torch.Tensor:
        members = [self.models[i] for i in group]
        version = tuple((id(t), t._version) for m in members for t in (*m.parameters(), *m.buffers()))
        cached = self._stacked.get(g)
        if cached is None or cached[0] != version:
            with torch.no_grad():
                params, buffers = stack_module_state(members)
            cached = (version, {k: v.detach() for k, v in params.items()}, buffers)
            self._stacked[g] = cached
        _, params, buffers = cached
        base = members[0]

        def one_model(p, b, *a):
            return functional_call(base, (p, b), a, kwargs)

        return vmap(one_model, in_dims=(0, 0, *([None] * len(args))))(params, buffers, *args)


__all__ = ["Ensemble", "MODES", "architecture_key"]
