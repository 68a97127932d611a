"""Ground-truth toy targets (TMS, residual MLP; modular addition saved/loaded too): a preset registry, training by name, and safetensors + JSON save/load."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decomp_hooks import store

from decomp_hooks.toy.resid_mlp import (
    RESID_MLP_PRESETS,
    ResidMLP,
    ResidMLPConfig,
    ResidMLPSampler,
    train_resid_mlp,
)
from decomp_hooks.toy.modadd import ModAddConfig, ModAddSampler, ModAddTransformer, fit_modadd
from decomp_hooks.toy.tms import TMS_PRESETS, TMSConfig, TMSModel, TMSSampler, train_tms

ToyConfig = TMSConfig | ResidMLPConfig | ModAddConfig
ToyModel = TMSModel | ResidMLP | ModAddTransformer
Sampler = Callable[[int], Tensor]

TOYS: dict[str, tuple[ToyConfig, dict[str, Any]]] = {**TMS_PRESETS, **RESID_MLP_PRESETS}


@dataclass(frozen=True)
class _Kind:
    """How to build, train and sample one family of toys."""

    config: type
    model: type[nn.Module]
    train: Callable[..., nn.Module]
    sampler: Callable[..., Sampler]


_KINDS = {
    "tms": _Kind(TMSConfig, TMSModel, train_tms, TMSSampler),
    "resid_mlp": _Kind(ResidMLPConfig, ResidMLP, train_resid_mlp, ResidMLPSampler),
    "modadd": _Kind(ModAddConfig, ModAddTransformer, fit_modadd, ModAddSampler),
}


def toy_names() -> list[str]:
    """Names accepted by `make_toy`."""
    return list(TOYS)


def _kind_name(config: ToyConfig) -> str:
    return next(name for name, kind in _KINDS.items() if isinstance(config, kind.config))


def toy_sampler(model: ToyModel, device: str | torch.device | None = None) -> Sampler:
    """The data callable `sampler(batch_size) -> batch` for a toy target, drawing from the global RNG."""
    return _KINDS[_kind_name(model.config)].sampler(model.config, device=device)


def make_toy(
    name: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    steps: int | None = None,
) -> tuple[ToyModel, Sampler]:
    """Train the named preset with its reference recipe (`steps` overrides the step count); returns it and its sampler."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; valid names: {', '.join(toy_names())}")
    config, recipe = TOYS[name]
    kwargs = recipe if steps is None else {**recipe, "steps": steps}
    model = _KINDS[_kind_name(config)].train(config, seed=seed, device=device, progress=progress, **kwargs)
    return model, toy_sampler(model, device)


def save_toy(model: ToyModel, path: str | os.PathLike[str], preset: str | None = None, seed: int | None = None,
             steps: int | None = None) -> None:
    """Write `model.safetensors` + `toy.json` into directory `path`, atomically (built aside, then renamed in).

    `preset`, `seed` and `steps` (None: the preset's own) say how the target was trained; without `preset` the first
    preset with the same shape is named (presets that share a shape, like `tms_40-10` and `tms_40-10-apd`, differ only
    in their training recipe)."""
    if preset is None:
        preset = next((name for name, (config, _) in TOYS.items() if config == model.config), None)
    meta = {"kind": _kind_name(model.config), "preset": preset, "seed": seed, "steps": steps,
            "config": asdict(model.config)}
    with store.atomic_dir(path, overwrite=True) as tmp:
        store.write_tensors(tmp / "model.safetensors", model.state_dict())
        store.write_json(tmp / "toy.json", meta)


def load_toy(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ToyModel:
    """Rebuild a toy saved by `save_toy` from its JSON config and load its weights (no pickle); in eval mode."""
    root = Path(path)
    meta = store.read_json(root / "toy.json")
    if meta.get("kind") not in _KINDS:
        raise ValueError(f"{root / 'toy.json'}: unknown toy kind {meta.get('kind')!r}; valid kinds: {', '.join(_KINDS)}")
    kind = _KINDS[meta["kind"]]
    try:
        config = kind.config(**meta["config"])
        with torch.device("meta"):  # shapes only: a foreign toy.json cannot make this allocate
            planned = {k: list(v.shape) for k, v in kind.model(config).state_dict().items()}
    except (TypeError, ValueError) as err:
        raise store.StoreError(f"{root / 'toy.json'}: its config cannot build a {meta['kind']} toy ({err}).") from None
    held = store.tensor_shapes(root / "model.safetensors")
    if planned != held:
        wrong = sorted(k for k in set(planned) | set(held) if planned.get(k) != held.get(k))
        raise store.StoreError(f"{root}: toy.json describes tensors {[(k, planned.get(k)) for k in wrong[:4]]} but "
                               f"model.safetensors holds {[(k, held.get(k)) for k in wrong[:4]]}; the files do not "
                               "belong together.")
    with torch.random.fork_rng(devices=[]):  # the init draws are overwritten; keep the global RNG as it was
        model = kind.model(config)
    model.load_state_dict(store.read_tensors(root / "model.safetensors"))
    return model.to(device).eval()
