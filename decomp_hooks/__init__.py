"""decomp-hooks: parameter decomposition (SPD, APD) for the models researchers already load.

    import decomp_hooks as dh
    dec = dh.decompose(model, sampler, targets={"linear1": 20}, config="examples/tms_5-2.yaml")
    dec.components["linear1"].V, dec.causal_importance(batch), dec.save("run/decomposition")
"""
from decomp_hooks.config import APDConfig, CIConfig, ConfigError, DecomposeConfig, LossConfig, ScheduleConfig, TrainConfig, load_config
from decomp_hooks.decomposition import Decomposition, load
from decomp_hooks.lib import LIBConfig, LIBResult, load_lib, local_interaction_basis
from decomp_hooks.run import decompose
from decomp_hooks.store import FingerprintError
from decomp_hooks import export  # noqa: F401  registers the signed SAE-Lens architecture once sae_lens is imported

__all__ = [
    "APDConfig", "CIConfig", "ConfigError", "DecomposeConfig", "Decomposition", "FingerprintError", "LossConfig",
    "ScheduleConfig", "TrainConfig", "decompose", "load", "load_config",
    "LIBConfig", "LIBResult", "load_lib", "local_interaction_basis",
]
