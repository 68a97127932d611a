"""Adapters: the model a user holds, seen through one interface (`Adapter`); one module per toolkit.

`adapter_for(model)` picks the first registered adapter that matches the model; `resolve` turns target globs into
the module to run and its sites.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from decomp_hooks.adapters.base import Adapter, HookNames
from decomp_hooks.adapters.nnsight import NNsightAdapter
from decomp_hooks.adapters.torch import TorchAdapter
from decomp_hooks.adapters.transformer_lens import TransformerLensAdapter
from decomp_hooks.sites import Site

#: Tried in order: nnsight wrappers and TransformerLens models are matched before the torch modules they also are.
ADAPTERS: list[Adapter] = [NNsightAdapter(), TransformerLensAdapter(), TorchAdapter()]

__all__ = ["ADAPTERS", "Adapter", "HookNames", "adapter_for", "resolve"]


def adapter_for(model: Any) -> Adapter:
    """The adapter of `model`'s toolkit; a TypeError names the object when no adapter takes it."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"cannot decompose a {type(model).__module__}.{type(model).__name__}; pass a torch nn.Module, "
                    "an nnsight model or a TransformerLens model.")


def resolve(model: Any, targets: dict[str, int], identity_targets: dict[str, int] | None = None
            ) -> tuple[nn.Module, list[Site], dict[str, int]]:
    """The torch module to run, its sites for the target globs, and C per site."""
    adapter = adapter_for(model)
    sites, cs = adapter.sites(model, targets, identity_targets)
    return adapter.module(model), sites, cs
