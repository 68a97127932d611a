"""LIB settings as a typed dataclass with the paper's defaults, loadable from YAML (docs/methods/lib.md,
docs/config-reference.md#lib-runs-lib)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decomp_hooks.config import ConfigError, config_path, from_dict, read_yaml
from decomp_hooks.lib.jacobians import INTEGRATION_RULES

BASES = ("lib", "pca")
DTYPES = ("float64", "float32")


@dataclass
class LIBConfig:
    """How to build the bases and the interaction graph. `layers` are node layers in forward order: module paths
    (TransformerLens hook points too), lists of them (one node of concatenated coordinates), and `output` last."""

    layers: list[Any] = field(default_factory=list)
    basis: str = "lib"  # lib (jacobian) | pca (the svd baseline, same code path)
    truncation_threshold: float = 1e-15
    rotate_final: bool = False  # True: the final node layer gets its centred PCA basis; False: used raw (C = I)
    last_position_from: str | None = None  # from this node layer on, only the last position is kept
    isolate: list[str] = field(default_factory=list)  # node members kept as their own direction (LayerNorm scale)
    integration: str = "gradient"  # gradient | trapezoidal | gauss-legendre (basis and edges)
    n_intervals: int = 0
    n_stochastic_sources_basis: int | None = None  # ±1 sources over output positions for M′ (None: exact)
    n_stochastic_sources_edges: int | None = None
    edges: bool = True
    dtype: str = "float64"  # the dtype the model runs in; M′, Grams and eigendecompositions are always float64
    batch_size: int = 1024
    n_samples: int | None = None  # rows of `data` to use (None: all of a tensor / iterable)
    memory_budget_gb: float | None = None  # per chunk of vmapped VJPs; None: 2 on CUDA, 0.03 on CPU (cache-sized)
    device: str | None = None  # None: the model's device
    seed: int = 0  # stochastic sources

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: LIBConfig) -> LIBConfig:
    """Range and choice checks; each error names the bad value and the accepted ones."""
    _check(len(cfg.layers) >= 2, f"layers={cfg.layers!r}: name at least two node layers in forward order, e.g. "
           "['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_mid', 'output'].")
    for layer in cfg.layers:
        ok = isinstance(layer, str) or (isinstance(layer, list) and layer and all(isinstance(m, str) for m in layer))
        _check(ok, f"layers: {layer!r} is neither a module name nor a list of module names.")
    _check(cfg.basis in BASES, f"basis={cfg.basis!r}; use 'lib' or 'pca'.")
    _check(cfg.truncation_threshold >= 0, f"truncation_threshold={cfg.truncation_threshold}: must be ≥ 0.")
    _check(cfg.integration in INTEGRATION_RULES, f"integration={cfg.integration!r}; use one of {', '.join(INTEGRATION_RULES)}.")
    _check(cfg.n_intervals >= 0, f"n_intervals={cfg.n_intervals}: must be ≥ 0.")
    _check(cfg.integration != "gradient" or cfg.n_intervals == 0,
           f"integration 'gradient' evaluates at α = 1 only; set n_intervals: 0 (got {cfg.n_intervals}).")
    for name in ("n_stochastic_sources_basis", "n_stochastic_sources_edges"):
        value = getattr(cfg, name)
        _check(value is None or value > 0, f"{name}={value}: must be a positive integer or null (exact).")
    _check(cfg.dtype in DTYPES, f"dtype={cfg.dtype!r}; use 'float64' or 'float32'.")
    _check(cfg.batch_size > 0, f"batch_size={cfg.batch_size}: must be > 0.")
    _check(cfg.n_samples is None or cfg.n_samples > 0, f"n_samples={cfg.n_samples}: must be > 0 or null.")
    _check(cfg.memory_budget_gb is None or cfg.memory_budget_gb > 0,
           f"memory_budget_gb={cfg.memory_budget_gb}: must be > 0, or null for the device's default.")
    return cfg


def load_lib_config(config: LIBConfig | dict | str | Path | None, **overrides: Any) -> LIBConfig:
    """A validated LIBConfig from a config object, a dict or a YAML path, with keyword overrides applied."""
    if config is None:
        cfg = LIBConfig()
    elif isinstance(config, LIBConfig):
        cfg = dataclasses.replace(config)
    elif isinstance(config, dict):
        cfg = from_dict(LIBConfig, config, where="lib config")
    else:
        path = config_path(config)
        data = read_yaml(path)
        cfg = from_dict(LIBConfig, data.get("lib", data) if isinstance(data, dict) else data, where=path.name)
    names = {f.name for f in dataclasses.fields(LIBConfig)}
    unknown = set(overrides) - names
    _check(not unknown, f"unknown LIB setting(s) {sorted(unknown)}; valid: {', '.join(sorted(names))}.")
    return validate(dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None}))


@dataclass
class LIBTargetConfig:
    """The CLI's model: a saved toy directory (`path`), or the modular-addition transformer trained on the spot."""

    toy: str | None = "modadd"
    path: str | None = None
    seed: int = 0
    lr: float = 1e-3
    steps: int = 60_000
    stop_accuracy: float = 0.99


@dataclass
class LIBRunConfig:
    """`decomp-hooks lib CONFIG.yaml`: the target, the LIB settings, and what to write besides the result."""

    target: LIBTargetConfig = field(default_factory=LIBTargetConfig)
    lib: LIBConfig = field(default_factory=LIBConfig)
    ablation: bool = True  # node and edge ablation curves (modular addition: test accuracy)
    ablation_samples: int | None = None  # test rows used for ablations (None: all)
    plot_top_k: int = 50


def load_lib_run_config(path: str | Path) -> LIBRunConfig:
    """A validated LIBRunConfig from a YAML file."""
    path = config_path(path)
    cfg = from_dict(LIBRunConfig, read_yaml(path), where=path.name)
    validate(cfg.lib)
    t = cfg.target
    _check(t.path is not None or t.toy == "modadd",
           f"target.toy={t.toy!r}: only 'modadd' is trained on the spot; give target.path (a saved toy) otherwise.")
    _check(cfg.ablation_samples is None or cfg.ablation_samples > 0, f"ablation_samples={cfg.ablation_samples}: must be > 0.")
    return cfg
