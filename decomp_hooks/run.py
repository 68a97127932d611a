"""`decompose()`: from the user's model, data and config to a trained Decomposition (and a run directory)."""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import distributed, store
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.config import ConfigError, DecomposeConfig, load_config, validate
from decomp_hooks.data import make_source
from decomp_hooks.decomposition import Decomposition, package_versions
from decomp_hooks.defaults import default_config, default_data, default_targets
from decomp_hooks.lm.capacity import fill_default_c
from decomp_hooks.methods import get_method
from decomp_hooks.train import Trainer, set_seed
from decomp_hooks.train.held_out import HeldOut
from decomp_hooks.train.runtime import uses_autocast
from decomp_hooks.train.run_lock import run_lock


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'.")
    return device


Targets = dict[str, int | None] | list[str]


def build_config(model: Any, config: Any, targets: Targets | None, steps: int | None, seed: int | None,
                 identity_targets: dict[str, int] | None) -> DecomposeConfig:
    """The config (without one, the recipe for the kind of model) with explicit arguments taking precedence over its
    values; without targets anywhere, every weight matrix of the model's blocks (C from the table)."""
    cfg = default_config(model) if config is None else load_config(config)
    if targets is not None:  # the config's site choices belong to its own target model
        cfg.targets = dict.fromkeys(targets) if isinstance(targets, (list, tuple)) else dict(targets)
        cfg.identity_targets, cfg.tied = {}, []
    if identity_targets is not None:
        cfg.identity_targets = dict(identity_targets)
    if steps is not None:
        cfg.train = dataclasses.replace(cfg.train, steps=steps)
    if seed is not None:
        cfg.seed = seed
    if not cfg.targets and not cfg.identity_targets:
        cfg.targets = default_targets(model)
    validate(cfg)
    return cfg


def decompose(model: Any, data: Any = None, targets: Targets | None = None, method: str | None = None,
              config: DecomposeConfig | dict | str | Path | None = None, steps: int | None = None,
              device: str | torch.device | None = None, seed: int | None = None, out_dir: str | Path | None = None,
              identity_targets: dict[str, int] | None = None, resume: bool = False, progress: bool = True,
              evaluate: Callable[[Decomposition, int], dict] | None = None,
              eval_data: torch.Tensor | None = None) -> Decomposition:
    """Decompose the chosen weight matrices of `model` into rank-one components with causal importances, by the
    config's method (`method` overrides it; `decomp_hooks.methods.method_names()` lists them).

    `targets` maps fnmatch globs of the model's module names to C (None: the default of its matrix type,
    docs/lm.md#components-per-matrix), or lists globs (all defaults); without targets here or in the config, every
    weight matrix of the model's blocks. `data` is a sampler `f(batch_size)`, a tensor or an iterable of batches;
    without it, a model that carries a tokenizer reads the config's `data:` text (the default recipe's: built-in).
    `eval_data` (rows, e.g. held-out token ids) is what evaluation reads instead of a training batch. `config` is a
    DecomposeConfig, dict, YAML path or shipped config's name; without it, the recipe for the kind of model
    (`decomp_hooks.default_config(model)`: VPD with KL for language models, SPD with MSE otherwise). Explicit
    `targets` replace the config's targets, identity targets and ties. With `out_dir`, writes config,
    metrics.jsonl, checkpoints and the final decomposition there; `resume=True` continues from its latest
    checkpoint. The model is put in eval mode (dropout off): the decomposed function is the deterministic one.

    Under torchrun (`decomp-hooks decompose --nproc N`) every rank calls this: the global batch `train.batch_size`
    is split over the ranks, gradients are averaged (DDP, or FSDP2 with `train.fsdp`), and rank 0 alone writes.
    """
    from decomp_hooks.adapters import resolve

    cfg = build_config(model, config, targets, steps, seed, identity_targets)
    if method is not None and method != cfg.method:
        cfg.method = method
        validate(cfg)
    method_cls = get_method(cfg.method)
    method_cls.check_trainable(cfg)
    ctx, dev = distributed.setup(resolve_device(device))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and not resume and (out / "checkpoints").exists():
        raise store.StoreError(f"{str(out)!r} already holds a run; pass resume=True (CLI: --resume RUN_DIR) to continue it, or another out_dir.")
    set_seed(cfg.seed)
    module, sites, cs = resolve(model, cfg.targets, cfg.identity_targets)
    module.eval()  # the function decomposed is the deterministic one: dropout off (a model built from a config trains)
    cs = fill_default_c(sites, cs, cfg.c_scale)
    cfg = method_cls.resolve(cfg, cs)
    cm = ComponentModel.from_config(module, sites, cs, cfg).to(dev)
    method_obj = method_cls(cfg, world_size=ctx.world_size)
    method_obj.init_components(cm)
    if cfg.train.compile:
        cm.compile_ci_fns()
    if data is None:
        data, held_out_rows = default_data(model, cfg, progress)
        eval_data = held_out_rows if eval_data is None else eval_data
    source = distributed.shard_source(make_source(data, cfg.train.batch_size, cfg.seed), ctx)
    if hasattr(source, "check_enough"):
        source.check_enough(cfg.train.steps + cfg.train.steps // cfg.train.eval_every + 1)
    dec = Decomposition(cm, cfg, provenance=_provenance(cfg, dev, cm, ctx.world_size), method=method_obj)
    extra = (lambda step: evaluate(dec, step)) if evaluate is not None else None
    held_out = None if eval_data is None else HeldOut(eval_data, eval_batch_size(cfg, ctx.world_size), ctx.rank,
                                                      ctx.world_size)
    trainer = Trainer(cm, method_obj, source, cfg, dev, out, extra, progress, rank=ctx.rank, world_size=ctx.world_size,
                      held_out=held_out)
    with run_lock(out) if out is not None and ctx.is_main else nullcontext():
        if out is not None and resume:
            trainer.resume()
        elif out is not None:
            trainer.start_fresh()
        start = time.perf_counter()
        dec.metrics = trainer.train()
        dec.step, dec.run_dir = cfg.train.steps, out
        dec.provenance["wall_time_s"] = time.perf_counter() - start
        with distributed.gathered(trainer.step_loss, whole=True):
            if out is not None and ctx.is_main:
                dec.save(out / "decomposition", overwrite=True)
    return dec


def eval_batch_size(cfg: DecomposeConfig, world_size: int) -> int:
    """Rows per evaluation forward: `train.eval_batch_size`, else a training micro-batch's."""
    t = cfg.train
    return t.eval_batch_size or t.micro_batch_size or max(t.batch_size // world_size, 1)


def _provenance(cfg: DecomposeConfig, device: torch.device, cm: ComponentModel, world_size: int) -> dict:
    return {"method": cfg.method, "seed": cfg.seed, "device": str(device), "world_size": world_size,
            "parallel": ("fsdp2" if cfg.train.fsdp else "ddp") if world_size > 1 else None,
            "autocast_bf16": uses_autocast(device, cfg.train), "dtype": "float32",
            "versions": package_versions(), "target_class": type(cm.target).__name__}
