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
entry that fusion_engine implements by an adapter that keeps mergekit's spec (parameter names,
scopes, defaults, input contract: configs resolve and validate exactly as before) and executes
:func:`fusion_engine.merge_tensors` per output tensor. ``uninstall`` puts the original objects back.

Semantics under the adapter: deterministic methods give mergekit's tensors (within float32
rounding); NaN/Inf inputs propagate as in mergekit. The random methods (dare_*, della*) draw
Philox masks: with ``install(seed=s)`` keyed by s and the tensor's name (reproducible whatever the
execution order); with ``seed=None`` the key is drawn from torch's global generator per tensor,
so ``mergekit-yaml --random-seed`` still governs the run, as it governs mergekit's masks.
fusion_engine validates parameter ranges more strictly (e.g. a density above 1 is a ConfigError).
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch

from .. import methods as fe_methods
from ..errors import ConfigError

_installed: dict[str, object] = {}  # method name -> the mergekit method object it replaced
_adapter_class = None


def _registry():
    try:
        from mergekit.merge_methods import registry
    except ImportError as error:  # pragma: no cover - mergekit is optional
        raise ConfigError("fusion_engine.compat.mergekit needs mergekit (pip install mergekit)") from error
    return registry


def _adapter():
    """The adapter class, a subclass of mergekit's MergeMethod (built once mergekit is imported)."""
    global _adapter_class
    if _adapter_class is None:
        from mergekit.merge_methods.base import MergeMethod

        class FusionEngineMethod(MergeMethod):
            """mergekit's spec, fusion_engine's computation."""

            supports_batching = False

            def __init__(self, original, seed: int | None, backend: str | None):
                self.original = original
                self.spec = original.spec
                self.seed = seed
                self.backend = backend
                self.randomized = fe_methods.get(original.spec.name).randomized

            def __repr__(self) -> str:
                return f"FusionEngineMethod({self.spec.name!r})"

            def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
                return tuple(self._merge_group(group, bound, dtype, out_dtype)
                             for group, bound, dtype in zip(groups, parameters, input_dtypes))

            def _merge_group(self, group, bound, dtype, out_dtype) -> torch.Tensor:
                entries = group.entries
                base_index = next((i for i, e in enumerate(entries) if e.is_base), None)
                params = dict(bound)
                if self.randomized:
                    params["random_seed"] = (self.seed if self.seed is not None
                                             else int(torch.randint(0, 1 << 62, (1,))))
                return fe_methods.api.merge_tensors(
                    [e.tensor for e in entries], self.spec.name, parameters=params, ids=[e.id for e in entries],
                    base_index=base_index, name=group.metadata.name, dtype=dtype, out_dtype=out_dtype,
                    check_finite=False, backend=self.backend)

        _adapter_class = FusionEngineMethod
    return _adapter_class


def install(methods: Iterable[str] | None = None, *, seed: int | None = None, backend: str | None = None) -> list[str]:
    """Make mergekit use fusion_engine for ``methods`` (default: every mergekit method fusion_engine has).

    Parameters
    ----------
    methods : names of mergekit methods to replace (each must exist in both)
    seed : key of the random methods' Philox masks (None: drawn from torch's generator per tensor)
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
    adapter = _adapter()
    for name in sorted(wanted):
        _installed[name] = registry._METHODS[name]
        registry._METHODS[name] = adapter(registry._METHODS[name], seed, backend)
    return sorted(wanted)


def uninstall() -> None:
    """Put mergekit's own method objects back (a no-op when nothing is installed)."""
    if not _installed:
        return
    registry = _registry()
    for name, original in _installed.items():
        if isinstance(registry._METHODS.get(name), _adapter()):
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
