"""Run mergekit on fusion_engine's methods: ``install()`` / ``uninstall()``.

>>> import fusion_engine.compat.mergekit as fe_mergekit
>>> fe_mergekit.install()          # mergekit-yaml merges and mergekit's merge_tensors now use fusion_engine
>>> ...                            # mergekit.merge.run_merge(...), mergekit.merge_methods.merge_tensors(...)
>>> fe_mergekit.uninstall()        # mergekit's own methods are back, the very same objects

From a shell: ``python -m fusion_engine.compat.mergekit config.yml ./out [mergekit-yaml options]``
is ``mergekit-yaml`` with fusion_engine's methods installed.

How: mergekit 0.1.5 looks every method up by name in one registry
(``mergekit.merge_methods.registry``; ``merge_methods.get``), from its ``merge_tensors`` /
``merge_state_dicts`` and from the merge graph of ``mergekit-yaml``. ``install`` replaces each
entry that fusion_engine implements by a method object of mergekit's own interface, of the same
kind as the one it replaces: a ``BatchedMergeMethod`` (``supports_batching``, ``merge_batch``,
an ``implementation`` kernel receiving mergekit's packed ``TensorBatch``: linear, slerp) or a
``GroupMergeMethod`` (``merge_group``), with mergekit's spec (parameter names, scopes, defaults,
input contract, ``pretty_name``, ``reference_url``, optional-tensor policy) and the original's
attributes (``sparsification_method``, ``consensus_method``, ``default_normalize``, ...).
mergekit's own binding, validation, batching, dtype promotion and graph adapter run unchanged;
each output tensor is computed by :func:`fusion_engine.methods.api.merge_tensors`.
``uninstall`` puts the original objects back.

Semantics under the adapter are mergekit's: deterministic methods give mergekit's tensors (within
float32 rounding); NaN/Inf inputs propagate; weights summing to zero in a normalised ``linear``
merge give NaN/±inf as mergekit's tensor division does (fusion_engine's own API raises a
ConfigError there). Merges are differentiable as mergekit's: inputs requiring grad take
fusion_engine's exact torch path (mergekit's values and gradients); coefficient tensors requiring
grad in a direct ``merge_batch`` call go to mergekit's own kernel. The random methods (dare_*, della*)
draw their masks with ``install(seed=None)`` (the default) from torch's global generator exactly
as mergekit does (the same masks under one ``torch.manual_seed`` / ``--random-seed``); with
``install(seed=s)`` from fusion_engine's fused Philox kernels keyed by s and the tensor's name
(reproducible whatever the execution order). fusion_engine validates parameter ranges more
strictly (e.g. a density above 1 is a ConfigError).
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch

from .. import methods as fe_methods
from ..errors import ConfigError
from ..ops._common import accum_dtype

_installed: dict[str, object] = {}  # method name -> the mergekit method object it replaced
_adapter_classes: tuple | None = None


def _registry():
    try:
        from mergekit.merge_methods import registry
    except ImportError as error:  # pragma: no cover - mergekit is optional
        raise ConfigError("fusion_engine.compat.mergekit needs mergekit (pip install mergekit)") from error
    return registry


def _adapters() -> tuple:
    """(group adapter, batched adapter): subclasses of mergekit's GroupMergeMethod and
    BatchedMergeMethod, built once mergekit is imported."""
    global _adapter_classes
    if _adapter_classes is None:
        from mergekit.merge_methods.base import BatchedMergeMethod, GroupMergeMethod

        class FusionEngineMethod:
            """mergekit's spec and attributes, fusion_engine's computation (one output tensor at a time)."""

            def __init__(self, original, seed: int | None, backend: str | None):
                for key, value in vars(original).items():  # e.g. GTA's sparsification_method
                    if key not in ("spec", "implementation"):
                        object.__setattr__(self, key, value)
                self.original = original
                self.spec = original.spec
                self.seed = seed
                self.backend = backend
                self.randomized = fe_methods.get(original.spec.name).randomized

            def __repr__(self) -> str:
                return f"{type(self).__name__}({self.spec.name!r})"

            def merge_one(self, tensors, ids, base_index, name, parameters) -> torch.Tensor:
                """The merged tensor of one group, already in its working dtype."""
                params = dict(parameters)
                if self.randomized:
                    params["random_seed"] = self.seed
                return fe_methods.api.merge_tensors(
                    tensors, self.spec.name, parameters=params, ids=ids, base_index=base_index, name=name,
                    check_finite=False, backend=self.backend)

        class FusionEngineGroupMethod(FusionEngineMethod, GroupMergeMethod):
            def merge_group(self, group, /, **parameters) -> torch.Tensor:
                entries = group.entries
                base_index = next((i for i, e in enumerate(entries) if e.is_base), None)
                return self.merge_one([e.tensor for e in entries], [e.id for e in entries], base_index,
                                      group.metadata.name, parameters)

        class FusionEngineBatchedMethod(FusionEngineMethod, BatchedMergeMethod):
            def __init__(self, original, seed: int | None, backend: str | None):
                super().__init__(original, seed, backend)
                self.implementation = self.merge_packed

            def merge_packed(self, batch, /, **parameters) -> torch.Tensor:
                """mergekit's batch kernel: G packed groups ([G, *shape] per input, coefficient
                tensors with G rows) merged group by group; returns [G, *shape]."""
                if any(isinstance(v, torch.Tensor) and v.requires_grad for v in parameters.values()):
                    return self.original.implementation(batch, **parameters)  # gradients for coefficients
                results = []
                for g in range(batch.tensors[0].shape[0]):
                    tensors = [t[g] for t in batch.tensors]
                    params = {k: (v[g].tolist() if isinstance(v, torch.Tensor) else v) for k, v in parameters.items()}
                    results.append(self._merge_divided(tensors, batch.base_index, params))
                return results[0].unsqueeze(0) if len(results) == 1 else torch.stack(results)

            def _merge_divided(self, tensors, base_index, params) -> torch.Tensor:
                weights = params.get("weight")
                if self.spec.name != "linear" or not params.get("normalize") or abs(sum(weights)) >= 1e-12:
                    return self.merge_one(tensors, None, base_index, None, params)
                # mergekit divides Σ w_i x_i by Σ w_i = 0 as a tensor: NaN or ±inf, not an error
                acc = accum_dtype(tensors[0].dtype)
                unnormalized = self.merge_one([t.to(acc) for t in tensors], None, base_index, None,
                                              dict(params, normalize=False))
                return (unnormalized / torch.tensor(sum(weights), dtype=acc)).to(tensors[0].dtype)

        _adapter_classes = (FusionEngineGroupMethod, FusionEngineBatchedMethod)
    return _adapter_classes


def install(methods: Iterable[str] | None = None, *, seed: int | None = None, backend: str | None = None) -> list[str]:
    """Make mergekit use fusion_engine for ``methods`` (default: every mergekit method fusion_engine has).

    Parameters
    ----------
    methods : names of mergekit methods to replace (each must exist in both)
    seed : key of the random methods' Philox masks (None: masks drawn from torch's global generator
        exactly as mergekit draws them)
    backend : the fusion_engine ops' backend (None: automatic)

    Returns the names replaced. Installing again first uninstalls.
    """
    registry = _registry()
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64):
        raise ConfigError(f"install: seed={seed!r} must be an int in [0, 2^64) or None")
    uninstall()
    ours = set(fe_methods.names())
    wanted = set(ours & set(registry._METHODS)) if methods is None else set(methods)
    for name in sorted(wanted):
        if name not in registry._METHODS or name not in ours:
            raise ConfigError(f"install: {name!r} is not a method of both mergekit and fusion_engine; "
                              f"choose from {sorted(ours & set(registry._METHODS))}")
    group_adapter, batched_adapter = _adapters()
    for name in sorted(wanted):
        original = registry._METHODS[name]
        _installed[name] = original
        adapter = batched_adapter if original.supports_batching else group_adapter
        registry._METHODS[name] = adapter(original, seed, backend)
    return sorted(wanted)


def uninstall() -> None:
    """Put mergekit's own method objects back (a no-op when nothing is installed)."""
    if not _installed:
        return
    registry = _registry()
    for name, original in _installed.items():
        if isinstance(registry._METHODS.get(name), _adapters()):
            registry._METHODS[name] = original
    _installed.clear()


def installed() -> list[str]:
    """Names of the mergekit methods currently running on fusion_engine."""
    return sorted(_installed)


def main(argv: list[str] | None = None) -> None:
    """``mergekit-yaml`` with fusion_engine's methods installed (exit 2 with the fix when mergekit is absent)."""
    try:
        from mergekit.scripts.run_yaml import main as mergekit_yaml
    except ImportError as exc:
        print(f"python -m fusion_engine.compat.mergekit runs mergekit-yaml on fusion_engine's methods and needs "
              f"mergekit, which cannot be imported here ({exc}): pip install mergekit==0.1.5. Without mergekit, "
              f"fusion-engine-yaml CONFIG OUT_DIR takes the same command line.", file=sys.stderr)
        sys.exit(2)

    install()
    try:
        mergekit_yaml.main(args=sys.argv[1:] if argv is None else argv, prog_name="fusion_engine.compat.mergekit")
    finally:
        uninstall()


if __name__ == "__main__":  # pragma: no cover
    main()
