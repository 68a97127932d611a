"""Adapters turn the model a user holds into sites; one module per toolkit, chosen by the model's type."""
from __future__ import annotations

from typing import Any

from torch import nn

from decomp_hooks.sites import Site


def resolve(model: Any, targets: dict[str, int], identity_targets: dict[str, int] | None = None) -> tuple[nn.Module, list[Site], dict[str, int]]:
    """The torch module to run, its sites for the target globs, and C per site."""
    from decomp_hooks.adapters import nnsight as nnsight_adapter
    from decomp_hooks.adapters import torch as torch_adapter
    from decomp_hooks.adapters import transformer_lens as tl_adapter

    if nnsight_adapter.is_nnsight(model):
        module = nnsight_adapter.unwrap(model)
        sites, cs = torch_adapter.sites(module, targets, identity_targets)
        return module, sites, cs
    if tl_adapter.is_transformer_lens(model):
        return tl_adapter.sites(model, targets, identity_targets)
    if isinstance(model, nn.Module):
        sites, cs = torch_adapter.sites(model, targets, identity_targets)
        return model, sites, cs
    raise TypeError(f"cannot decompose a {type(model).__module__}.{type(model).__name__}; pass a torch nn.Module, "
                    "an nnsight model or a TransformerLens model.")
