"""Local Interaction Basis (Bushnaq et al. 2024) and the interaction graph between adjacent node layers
(docs/methods/lib.md)."""
from decomp_hooks.lib.build import local_interaction_basis
from decomp_hooks.lib.config import LIBConfig, load_lib_config
from decomp_hooks.lib.result import LIBResult, load_lib

__all__ = ["LIBConfig", "LIBResult", "load_lib", "load_lib_config", "local_interaction_basis"]
