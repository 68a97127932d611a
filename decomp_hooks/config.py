"""Typed run configuration: dataclasses with their defaults, loaded strictly from dicts or YAML files.

Unknown keys are errors with a did-you-mean, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from decomp_hooks.configs import config_names, shipped_config
from decomp_hooks.lm.data import DataConfig
from decomp_hooks.lm.model import ModelConfig
from decomp_hooks.methods.apd.config import APDConfig
from decomp_hooks.methods.registry import get_method
from decomp_hooks.methods.spd.config import LossConfig
from decomp_hooks.methods.vpd.config import VPDConfig


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it and the fix."""


@dataclass
class CIConfig:
    """Causal-importance functions: per site `mlp` (per component, the SPD paper's), `vector_mlp` or `shared_mlp`;
    or one for all sites at once, `global_shared_mlp` or `global_shared_transformer` (VPD's)."""

    type: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [16])  # hidden widths of the MLP types
    sigmoid: str = "leaky_hard"  # leaky_hard | hard | normal | upper_leaky_hard
    sampling: str = "continuous"  # continuous | binomial
    d_model: int = 128  # global_shared_transformer: width
    n_blocks: int = 2  # global_shared_transformer: pre-norm attention + feed-forward blocks
    n_heads: int = 4  # global_shared_transformer: attention heads (d_model / n_heads must be even, for RoPE)
    d_ffn: int | None = None  # global_shared_transformer: feed-forward width (None: 4 · d_model)
    rope_base: float = 10_000.0  # global_shared_transformer: RoPE base


@dataclass
class ScheduleConfig:
    """Linear warmup over `warmup_pct` of the steps, then constant, linear or cosine decay to `final_val_frac`."""

    fn: str = "constant"
    warmup_pct: float = 0.0
    final_val_frac: float = 1.0


@dataclass
class TrainConfig:
    """The optimisation loop: Adam (weight decay 0), schedule, clipping, AMP, logging and checkpoints."""

    steps: int = 10_000
    batch_size: int = 4096  # the global batch (rows), split over the processes under torchrun
    micro_batch_size: int | None = None  # rows per forward+backward; gradients accumulate over a process's share
    eval_batch_size: int | None = None  # rows per evaluation forward on held-out data (None: a micro-batch's)
    lr: float = 1e-3
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip_components: float | None = None
    grad_clip_ci_fns: float | None = None
    autocast_bf16: bool = True  # on CUDA; parameters stay fp32
    autocast_bf16_cpu: bool = False  # bf16 on CPUs with bf16 units (AMX/AVX512-BF16), ~3× faster; fp32 elsewhere
    compile: bool = False  # torch.compile the CI functions: ~2× faster steps after a few seconds of compilation
    tf32: bool = True  # on CUDA, TF32 matmuls inside the training step (the faithfulness warmup stays fp32)
    threads: int | None = None  # CPU torch threads for the run (None: chosen for the work size, docs/usage.md)
    keep_freed_memory: bool = True  # on CPU with glibc: reuse freed large blocks, not mmap/munmap each step (~15% faster)
    fsdp: bool = False  # with several processes: FSDP2-shard components, CI functions and the target's blocks (not DDP)
    faithfulness_warmup_steps: int = 200
    faithfulness_warmup_lr: float = 0.01
    faithfulness_warmup_weight_decay: float = 0.1
    log_every: int = 100
    eval_every: int = 1000
    eval_pgd_steps: int = 20  # the evaluation PGD probe (steps of size 0.1); 0 skips it
    eval_pgd_scope: str = "unique_per_datapoint"  # its sources: per position, or shared_across_batch (VPD's LM eval)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2


def micro_batches(train: TrainConfig, world_size: int = 1) -> int:
    """How many micro-batches each process's share of the global batch is split into (gradient accumulation)."""
    local = train.batch_size // world_size
    if train.micro_batch_size is None or train.micro_batch_size >= local:
        return 1
    if local % train.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={train.micro_batch_size} does not divide the per-process batch "
                          f"{local} (train.batch_size={train.batch_size} over {world_size} process(es)); use a divisor "
                          f"of {local}.")
    return local // train.micro_batch_size


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
    targets: dict[str, int | None] = field(default_factory=dict)  # module glob -> C (null: from the C table)
    c_scale: float = 1.0  # multiplies the C table's defaults (docs/lm.md#components-per-matrix)
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
    model: ModelConfig | None = None
    data: DataConfig | None = None
    apd: APDConfig = field(default_factory=APDConfig)
    vpd: VPDConfig = field(default_factory=VPDConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def did_you_mean(key: str, options: list[str]) -> str:
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
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(key, names)}")
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
        path = config_path(config)
        cfg = from_dict(DecomposeConfig, read_yaml(path), where=path.name)
    validate(cfg)
    return cfg


def config_path(config: str | Path) -> Path:
    """The YAML file a config argument names: an existing path, else a shipped config's name (`tms_5-2`,
    `lm/small_vpd`); a ConfigError lists the names when it is neither."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = shipped_config(str(config))
    if shipped is not None:
        return shipped
    names = config_names()
    close = difflib.get_close_matches(str(config).removesuffix(".yaml"), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config file {str(config)!r} does not exist, and it is not a shipped config's name.{hint} Shipped "
                      f"configs: {', '.join(names)}; or pass a dict or a DecomposeConfig.")


def read_yaml(path: Path) -> Any:
    """The parsed YAML file at `path` ({} when empty); a ConfigError when it is missing or not YAML."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


#: the CI function types `ci.type` accepts
CI_TYPES = ("mlp", "vector_mlp", "shared_mlp", "global_shared_mlp", "global_shared_transformer")


def validate(cfg: DecomposeConfig) -> None:
    """Range and choice checks, each naming the bad value and the accepted ones; then the method's own checks."""
    check(cfg.ci.type in CI_TYPES, f"ci.type={cfg.ci.type!r}; use one of {', '.join(map(repr, CI_TYPES))}.")
    check(cfg.ci.d_model > 0 and cfg.ci.n_blocks >= 0 and cfg.ci.n_heads > 0 and (cfg.ci.d_ffn or 1) > 0,
          f"ci: d_model={cfg.ci.d_model}, n_heads={cfg.ci.n_heads}, d_ffn={cfg.ci.d_ffn} must be positive and "
          f"n_blocks={cfg.ci.n_blocks} ≥ 0.")
    check(cfg.ci.d_model % (2 * cfg.ci.n_heads) == 0,
          f"ci.d_model={cfg.ci.d_model} must be a multiple of 2 · ci.n_heads={cfg.ci.n_heads} (an even head width, "
          "for RoPE).")
    check(all(h > 0 for h in cfg.ci.hidden), f"ci.hidden={cfg.ci.hidden}: widths must be positive.")
    check(cfg.ci.sigmoid in ("leaky_hard", "hard", "normal", "upper_leaky_hard"),
          f"ci.sigmoid={cfg.ci.sigmoid!r}; use 'leaky_hard', 'hard', 'normal' or 'upper_leaky_hard'.")
    check(cfg.ci.sampling in ("continuous", "binomial"),
          f"ci.sampling={cfg.ci.sampling!r}; use 'continuous' or 'binomial'.")
    check(cfg.output_loss in ("mse", "kl"), f"output_loss={cfg.output_loss!r}; use 'mse' or 'kl'.")
    check(cfg.init in ("kaiming", "paper"), f"init={cfg.init!r}; use 'kaiming' or 'paper'.")
    for name, c in {**cfg.targets, **cfg.identity_targets}.items():
        check(c is None and name in cfg.targets or isinstance(c, int) and not isinstance(c, bool) and c > 0,
              f"targets[{name!r}]={c!r}: C must be a positive integer (or, for targets, null: C from the table).")
    check(0 < cfg.c_scale < math.inf, f"c_scale={cfg.c_scale}: must be finite and > 0.")
    check(0 <= cfg.ci_alive_threshold < 1, f"ci_alive_threshold={cfg.ci_alive_threshold}: must be in [0, 1).")
    check(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32, f"seed={cfg.seed!r}: must be an integer in [0, 2³²).")
    check(cfg.ci.rope_base > 1, f"ci.rope_base={cfg.ci.rope_base}: must be > 1.")
    t = cfg.train
    check(t.steps >= 0, f"train.steps={t.steps}: must be ≥ 0.")
    check(t.batch_size > 0, f"train.batch_size={t.batch_size}: must be > 0.")
    check(t.micro_batch_size is None or t.micro_batch_size > 0,
          f"train.micro_batch_size={t.micro_batch_size}: must be > 0, or null for no accumulation.")
    check(t.eval_batch_size is None or t.eval_batch_size > 0, f"train.eval_batch_size={t.eval_batch_size}: must be > 0.")
    micro_batches(t)
    check(0 < t.lr < math.inf, f"train.lr={t.lr}: must be finite and > 0.")
    for key in ("grad_clip_components", "grad_clip_ci_fns"):
        value = getattr(t, key)
        check(value is None or 0 < value < math.inf, f"train.{key}={value}: must be finite and > 0, or null (no clipping).")
    check(0 <= t.schedule.final_val_frac <= 1, f"train.schedule.final_val_frac={t.schedule.final_val_frac}: must be in "
          "[0, 1].")
    check(t.faithfulness_warmup_steps >= 0, f"train.faithfulness_warmup_steps={t.faithfulness_warmup_steps}: must be ≥ 0.")
    check(0 < t.faithfulness_warmup_lr < math.inf,
          f"train.faithfulness_warmup_lr={t.faithfulness_warmup_lr}: must be finite and > 0.")
    check(0 <= t.faithfulness_warmup_weight_decay < math.inf,
          f"train.faithfulness_warmup_weight_decay={t.faithfulness_warmup_weight_decay}: must be finite and ≥ 0.")
    check(t.eval_pgd_steps >= 0, f"train.eval_pgd_steps={t.eval_pgd_steps}: must be ≥ 0 (0 skips the PGD probe).")
    check(t.schedule.fn in ("constant", "linear", "cosine"),
          f"train.schedule.fn={t.schedule.fn!r}; use 'constant', 'linear' or 'cosine'.")
    check(0 <= t.schedule.warmup_pct <= 1, f"train.schedule.warmup_pct={t.schedule.warmup_pct}: must be in [0, 1].")
    check(t.log_every > 0 and t.eval_every > 0 and t.checkpoint_every > 0,
          "train.log_every, eval_every and checkpoint_every must be > 0.")
    check(t.eval_pgd_scope in ("unique_per_datapoint", "shared_across_batch"),
          f"train.eval_pgd_scope={t.eval_pgd_scope!r}; use 'unique_per_datapoint' or 'shared_across_batch'.")
    check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints}: must be ≥ 1.")
    check(t.threads is None or isinstance(t.threads, int) and not isinstance(t.threads, bool) and t.threads >= 1,
          f"train.threads={t.threads!r}: must be an integer ≥ 1, or null (chosen for the work size).")
    get_method(cfg.method).validate(cfg)
