"""nnsight models: decompose the module they wrap, and read or edit components inside `model.trace(...)`.

nnsight shows HF module paths (`transformer.h.0.mlp.c_fc`), so the adapter is the torch adapter on the wrapped
module; inside a trace the same `SiteComponents.forward` replaces a site's output through its Envoy.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from decomp_hooks.adapters.torch import TorchAdapter
from decomp_hooks.components import SiteMask


class NNsightAdapter(TorchAdapter):
    """nnsight `NNsight` / `TransformersModel` / `LanguageModel`: everything as for the torch module they wrap."""

    def matches(self, model: Any) -> bool:
        return any(c.__module__.startswith("nnsight") for c in type(model).__mro__)

    def module(self, model: Any) -> nn.Module:
        """The wrapped torch module (dispatched first if the model loads lazily)."""
        if getattr(model, "dispatched", True) is False and hasattr(model, "dispatch"):
            model.dispatch()
        module = model._module
        if not isinstance(module, nn.Module):
            raise TypeError(f"nnsight model {type(model).__name__} wraps a {type(module).__name__}, not a torch module.")
        return module


def intervene(dec: Any, model: Any, masks: dict[str, SiteMask] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Inside `with model.trace(...)`: per site, read CI and component activations; replace outputs of masked sites.

    Sites are visited in the order the forward pass reaches them, as nnsight requires. Returns
    `{site: {"ci": [..., C], "acts": [..., C]}}`, saved so they outlive the trace.
    """
    import nnsight

    masks = masks or {}
    readout = {}
    for name in dec.site_names:
        comps, site = dec.cm.component(name), dec.cm.sites[name]
        if site.kind.inserted:
            raise ValueError(f"site {name!r}: inserted identities cannot be edited inside an nnsight trace; use dec.run().")
        envoy = model.get(site.module)
        x = envoy.input
        acts = comps.inner_acts(x)
        ci = dec.cm.causal_importances({name: x})[name].lower
        if name in masks:
            envoy.output = comps(x, masks[name])
        readout[name] = {"ci": ci.detach(), "acts": acts.detach()}
    return nnsight.save(readout)


def replace_output(model: Any, site: Any, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Inside `with model.trace(...)`: the site's output becomes `fn(input, output)`."""
    if site.kind.inserted:
        raise ValueError(f"site {site.name!r}: inserted identities cannot be edited inside an nnsight trace; use "
                         "edit.model() instead.")
    envoy = model.get(site.module)
    envoy.output = fn(envoy.input, envoy.output)
