"""Mixture-of-experts models assembled from dense fine-tunes (mergekit-moe's YAML and rules).

* :func:`build_moe` — ``fusion-engine moe CONFIG OUT``: Mixtral, Qwen2-MoE or Qwen3-MoE output.
* :func:`load_moe_config` / :class:`MoEConfig` — the config; :func:`gate_vectors` — the routers.
"""

from .._lazy import lazy_exports

# public name -> the module defining it, imported on first access (the command line stays light)
__getattr__, __dir__ = lazy_exports(__name__, {
    "ARCHITECTURES": ".build", "build_moe": ".build", "select_architecture": ".build", "Expert": ".config",
    "MoEConfig": ".config", "check_moe_config": ".config", "load_moe_config": ".config",
    "parse_moe_config": ".config", "gate_vectors": ".gates",
})

__all__ = ["ARCHITECTURES", "Expert", "MoEConfig", "build_moe", "check_moe_config", "gate_vectors",
           "load_moe_config", "parse_moe_config", "select_architecture"]
