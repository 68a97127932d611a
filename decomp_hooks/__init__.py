"""decomp-hooks: parameter decomposition (SPD, VPD, APD) and local interaction bases for the models researchers
already load.

    import decomp_hooks as dh
    dec = dh.decompose(model)                       # a language model with a tokenizer: every block matrix, VPD
    dec = dh.decompose(model, sampler, targets={"linear1": 20}, config="tms_5-2")
    dec.components["linear1"].V, dec.causal_importance(batch), dec.save("run/decomposition")
"""
from decomp_hooks.clustering import cluster
from decomp_hooks.config import APDConfig, CIConfig, ConfigError, DecomposeConfig, LossConfig, ScheduleConfig, TrainConfig, load_config
from decomp_hooks.decomposition import Decomposition, load
from decomp_hooks.defaults import default_config
from decomp_hooks.graph import AttributionGraph, attribution_graph
from decomp_hooks.harvest import harvest, load_harvest
from decomp_hooks.lib import LIBConfig, LIBResult, load_lib, local_interaction_basis
from decomp_hooks.methods import Method, StepOutput, get_method, register
from decomp_hooks.run import decompose
from decomp_hooks.store import FingerprintError

__all__ = [
    "APDConfig", "CIConfig", "ConfigError", "DecomposeConfig", "Decomposition", "FingerprintError", "LossConfig",
    "Method", "ScheduleConfig", "StepOutput", "TrainConfig", "decompose", "default_config", "get_method", "load", "load_config", "register",
    "LIBConfig", "LIBResult", "load_lib", "local_interaction_basis", "harvest", "load_harvest", "cluster",
    "AttributionGraph", "attribution_graph",
]
