"""Mixture-of-experts models assembled from dense fine-tunes (mergekit-moe's YAML and rules).

* :func:`build_moe` — ``fusion-engine moe CONFIG OUT``: Mixtral, Qwen2-MoE or Qwen3-MoE output.
* :func:`load_moe_config` / :class:`MoEConfig` — the config; :func:`gate_vectors` — the routers.
"""

from .build import ARCHITECTURES, build_moe, select_architecture
from .config import Expert, MoEConfig, check_moe_config, load_moe_config, parse_moe_config
from .gates import gate_vectors

__all__ = ["ARCHITECTURES", "Expert", "MoEConfig", "build_moe", "check_moe_config", "gate_vectors",
           "load_moe_config", "parse_moe_config", "select_architecture"]
