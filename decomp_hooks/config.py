"""Typed run configuration: dataclasses with their defaults, loaded strictly from dicts or YAML files.

Unknown keys are errors with a did-you-mean, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it and the fix."""


@dataclass
class CIConfig:
    """Causal-importance functions: `mlp` (per component, the paper's), `vector_mlp` or `shared_mlp`."""

    type: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [16])
    sigmoid: str = "leaky_hard"
    sampling: str = "continuous"


@dataclass
class ScheduleConfig:
    """Linear warmup over `warmup_pct` of the steps, then constant, linear or cosine decay to `final_val_frac`."""

    fn: str = "constant"
    warmup_pct: float = 0.0
    final_val_frac: float = 1.0


@dataclass
class LossConfig:
    """One loss term. `type` picks it; the remaining fields apply to the types named in their comments."""

    type: str
    coeff: float = 1.0
    # importance_minimality
    pnorm: float = 2.0
    p_anneal_start_frac: float = 1.0
    p_anneal_final_p: float | None = None
    p_anneal_end_frac: float = 1.0
    eps: float = 1e-12
    beta: float = 0.0
    site_coeffs: dict[str, float] = field(default_factory=dict)  # fnmatch glob -> multiplier on those sites (others 1)
    # *_subset terms
    routing: str = "uniform_k_subset"
    routing_p: float = 0.5
    # pgd_* terms
    init: str = "random"
    step_size: float = 1.0
    n_steps: int = 1
    mask_scope: str = "shared_across_batch"


@dataclass
class TrainConfig:
    """The optimisation loop: Adam (weight decay 0), schedule, clipping, AMP, logging and checkpoints."""

    steps: int = 10_000
    batch_size: int = 4096
    lr: float = 1e-3
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip_components: float | None = None
    grad_clip_ci_fns: float | None = None
    autocast_bf16: bool = True  # on CUDA; parameters stay fp32
    autocast_bf16_cpu: bool = False  # on CPUs with bf16 matrix units (AMX/AVX512-BF16) matmuls run ~3× faster
    compile: bool = False  # torch.compile the CI functions: ~2× faster steps after a few seconds of compilation
    tf32: bool = True  # on CUDA, TF32 matmuls inside the training step (the faithfulness warmup stays fp32)
    keep_freed_memory: bool = True  # on CPU with glibc: reuse freed large blocks, not mmap/munmap each step (~15% faster)
    fsdp: bool = False  # with several processes: FSDP2-shard components, CI functions and the target's blocks (not DDP)
    faithfulness_warmup_steps: int = 200
    faithfulness_warmup_lr: float = 0.01
    faithfulness_warmup_weight_decay: float = 0.1
    log_every: int = 100
    eval_every: int = 1000
    eval_pgd_steps: int = 20  # the evaluation PGD probe (steps of size 0.1); 0 skips it
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2


@dataclass
class APDConfig:
    """APD (methods.md Part 2): C components spanning every site, each of rank `rank` per site (None = full rank,
    min(d_in, d_out)), chosen per input by the top-k of their attributions; the loss coefficients of §2.4."""

    C: int | None = None  # None: the (common) C of `targets`
    rank: int | None = None
    topk: float = 1.0  # batch top-k: mean active components per position (may be fractional); else k per position
    batch_topk: bool = True
    attribution_type: str = "gradient"  # gradient | ablation | activation
    attribution_model: str = "target"  # gradient attributions at the target's parameters, or at the APD model's
    attribution_chunk: int | None = None  # output directions per batched VJP (None: all in one call)
    schatten_p: float = 1.0
    param_match_coeff: float = 1.0
    topk_recon_coeff: float = 1.0
    act_recon_coeff: float = 0.0
    schatten_coeff: float = 1.0
    act_recon_sites: list[str] = field(default_factory=lambda: ["*mlp_in"])  # fnmatch globs; outputs ReLU'd
    unit_norm_matrices: bool = False
    init_scale: float = 1.0
    distil_from_target: bool = False  # the last component is always on and outside the top-k


@dataclass
class TargetConfig:
    """Where the CLI gets the model when none is passed in: a toy preset trained on the spot, or a saved toy."""

    toy: str | None = None
    path: str | None = None
    steps: int | None = None
    seed: int = 0


@dataclass
class DecomposeConfig:
    """Everything a decomposition run needs besides the model and data."""

    method: str = "spd"
    targets: dict[str, int] = field(default_factory=dict)
    identity_targets: dict[str, int] = field(default_factory=dict)
    tied: list[list[str]] = field(default_factory=list)
    ci: CIConfig = field(default_factory=CIConfig)
    losses: list[LossConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    use_delta_component: bool = True
    output_loss: str = "mse"
    init: str = "kaiming"
    ci_alive_threshold: float = 0.1
    seed: int = 0
    target: TargetConfig | None = None
    apd: APDConfig = field(default_factory=APDConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(options)}."


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a plain YAML value to the annotated type `tp`, recursing into dataclasses and containers."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}.")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{key}'.{_did_you_mean(key, names)}")
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(config: DecomposeConfig | dict | str | Path | None) -> DecomposeConfig:
    """Accept a config object, a dict or a YAML path and return a validated DecomposeConfig."""
    if config is None:
        cfg = DecomposeConfig()
    elif isinstance(config, DecomposeConfig):
        cfg = dataclasses.replace(config)
    elif isinstance(config, dict):
        cfg = from_dict(DecomposeConfig, config)
    else:
        path = Path(config)
        cfg = from_dict(DecomposeConfig, read_yaml(path, "; pass a YAML path, a dict or a DecomposeConfig."), where=path.name)
    validate(cfg)
    return cfg


def read_yaml(path: Path, hint: str = ".") -> Any:
    """The parsed YAML file at `path` ({} when empty); a ConfigError when it is missing (`hint` says what to pass) or
    not YAML."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist{hint}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


LOSS_TYPES = (
    "faithfulness", "importance_minimality", "stochastic_recon", "stochastic_recon_layerwise",
    "stochastic_recon_subset", "ci_masked_recon", "ci_masked_recon_layerwise", "ci_masked_recon_subset",
    "unmasked_recon", "pgd_recon", "pgd_recon_layerwise", "pgd_recon_subset", "stochastic_hidden_acts_recon",
)


METHODS = ("spd", "apd")


def validate_apd(cfg: DecomposeConfig) -> None:
    """The `apd:` section, and the parts of the rest of the config APD reads differently."""
    a = cfg.apd
    _check(not cfg.losses, "losses: lists SPD loss terms; APD's loss coefficients are in `apd:` "
           "(param_match_coeff, topk_recon_coeff, act_recon_coeff, schatten_coeff). Remove `losses:` or use method 'spd'.")
    _check(a.C is None or a.C > 0, f"apd.C={a.C}: must be a positive integer.")
    _check(a.rank is None or a.rank > 0, f"apd.rank={a.rank}: must be a positive integer, or null for full rank.")
    _check(a.topk > 0, f"apd.topk={a.topk}: must be > 0.")
    _check(a.batch_topk or float(a.topk).is_integer(),
           f"apd.topk={a.topk}: per-sample top-k (batch_topk: false) needs an integer k.")
    _check(a.attribution_type in ("gradient", "ablation", "activation"),
           f"apd.attribution_type={a.attribution_type!r}; use 'gradient', 'ablation' or 'activation'.")
    _check(a.attribution_model in ("target", "apd"), f"apd.attribution_model={a.attribution_model!r}; use 'target' or 'apd'.")
    _check(a.attribution_chunk is None or a.attribution_chunk > 0, f"apd.attribution_chunk={a.attribution_chunk}: must be > 0.")
    _check(a.schatten_p > 0, f"apd.schatten_p={a.schatten_p}: must be > 0.")
    for name in ("param_match_coeff", "topk_recon_coeff", "act_recon_coeff", "schatten_coeff"):
        _check(getattr(a, name) >= 0, f"apd.{name}={getattr(a, name)}: must be ≥ 0.")
    _check(a.init_scale > 0, f"apd.init_scale={a.init_scale}: must be > 0.")
    cs = set({**cfg.targets, **cfg.identity_targets}.values())
    _check(a.C is not None or len(cs) <= 1,
           f"APD components span every site, so the targets need one common C (got {sorted(cs)}); or set apd.C.")


def validate(cfg: DecomposeConfig) -> None:
    """Range and choice checks, each naming the bad value and the accepted ones."""
    _check(cfg.method in METHODS, f"method={cfg.method!r} is not supported; use 'spd' or 'apd'.")
    if cfg.method == "apd":
        validate_apd(cfg)
    _check(cfg.ci.type in ("mlp", "vector_mlp", "shared_mlp"),
           f"ci.type={cfg.ci.type!r}; use 'mlp', 'vector_mlp' or 'shared_mlp'.")
    _check(all(h > 0 for h in cfg.ci.hidden), f"ci.hidden={cfg.ci.hidden}: widths must be positive.")
    _check(cfg.ci.sigmoid in ("leaky_hard", "hard", "normal", "upper_leaky_hard"),
           f"ci.sigmoid={cfg.ci.sigmoid!r}; use 'leaky_hard', 'hard', 'normal' or 'upper_leaky_hard'.")
    _check(cfg.ci.sampling in ("continuous", "binomial"),
           f"ci.sampling={cfg.ci.sampling!r}; use 'continuous' or 'binomial'.")
    _check(cfg.output_loss in ("mse", "kl"), f"output_loss={cfg.output_loss!r}; use 'mse' or 'kl'.")
    _check(cfg.init in ("kaiming", "paper"), f"init={cfg.init!r}; use 'kaiming' or 'paper'.")
    for name, c in {**cfg.targets, **cfg.identity_targets}.items():
        _check(isinstance(c, int) and c > 0, f"targets[{name!r}]={c!r}: C must be a positive integer.")
    t = cfg.train
    _check(t.steps >= 0, f"train.steps={t.steps}: must be ≥ 0.")
    _check(t.batch_size > 0, f"train.batch_size={t.batch_size}: must be > 0.")
    _check(t.lr > 0, f"train.lr={t.lr}: must be > 0.")
    _check(t.schedule.fn in ("constant", "linear", "cosine"),
           f"train.schedule.fn={t.schedule.fn!r}; use 'constant', 'linear' or 'cosine'.")
    _check(0 <= t.schedule.warmup_pct <= 1, f"train.schedule.warmup_pct={t.schedule.warmup_pct}: must be in [0, 1].")
    _check(t.log_every > 0 and t.eval_every > 0 and t.checkpoint_every > 0,
           "train.log_every, eval_every and checkpoint_every must be > 0.")
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints}: must be ≥ 1.")
    for i, loss in enumerate(cfg.losses):
        where = f"losses[{i}]"
        _check(loss.type in LOSS_TYPES, f"{where}.type={loss.type!r} is unknown.{_did_you_mean(loss.type, list(LOSS_TYPES))}")
        _check(loss.coeff >= 0, f"{where}.coeff={loss.coeff}: must be ≥ 0.")
        _check(loss.pnorm > 0, f"{where}.pnorm={loss.pnorm}: must be > 0.")
        _check(not loss.site_coeffs or loss.type == "importance_minimality",
               f"{where}.site_coeffs: only the importance_minimality term takes per-site multipliers; remove it from {loss.type!r}.")
        for pattern, w in loss.site_coeffs.items():
            _check(w >= 0, f"{where}.site_coeffs[{pattern!r}]={w}: must be ≥ 0.")
        _check(loss.routing in ("uniform_k_subset", "static_probability"),
               f"{where}.routing={loss.routing!r}; use 'uniform_k_subset' or 'static_probability'.")
        _check(loss.init in ("random", "ones", "zeroes"), f"{where}.init={loss.init!r}; use 'random', 'ones' or 'zeroes'.")
        _check(loss.mask_scope in ("unique_per_datapoint", "shared_across_batch"),
               f"{where}.mask_scope={loss.mask_scope!r}; use 'unique_per_datapoint' or 'shared_across_batch'.")
        _check(loss.n_steps >= 1, f"{where}.n_steps={loss.n_steps}: must be ≥ 1.")
    _check(len({loss.type for loss in cfg.losses}) == len(cfg.losses), "losses: each type may appear once.")
