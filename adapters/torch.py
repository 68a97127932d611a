"""Sites on plain torch modules: `nn.Linear`, HF `Conv1D`, `nn.Embedding`, `TiedLinear`, and inserted identities.

Forward hooks read each site's input and replace its output; names are the module paths of `named_modules()`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from decomp_hooks.sites import SiteError, SiteHook, match_targets
from decomp_hooks.tied import TiedLinear

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, decomp_hooks.tied.TiedLinear"


def _is_conv1d(module: nn.Module) -> bool:
    """HF GPT-2 `Conv1D` (`y = x W + b`, W `[d_in, d_out]`), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def canonical_weight_fn(module: nn.Module) -> Callable[[nn.Module], torch.Tensor] | None:
    """The function giving this module's weight as `[d_out, d_in]`, or None if it is not a supported site."""
    if isinstance(module, (nn.Linear, TiedLinear)):
        return lambda m: m.weight
    if _is_conv1d(module):
        return lambda m: m.weight.T
    if isinstance(module, nn.Embedding):
        return lambda m: m.weight.T
    return None


class ModuleSite:
    """A site on one torch module; `kind` says whether it is linear, an embedding lookup or an inserted identity."""

    def __init__(self, name: str, module: nn.Module, kind: str, weight_fn: Callable[[nn.Module], torch.Tensor]):
        self.name, self.module, self.kind = name, module, kind
        self._weight_fn = weight_fn
        self.d_out, self.d_in = self.weight().shape

    def weight(self) -> torch.Tensor:
        w = self._weight_fn(self.module).detach()
        return torch.eye(w.shape[1], dtype=w.dtype, device=w.device) if self.kind == "identity" else w

    def bias(self) -> torch.Tensor | None:
        if self.kind != "linear":
            return None
        b = getattr(self.module, "bias", None)
        return b.detach() if isinstance(b, torch.Tensor) else None

    def hook(self, fn: SiteHook) -> RemovableHandle:
        if self.kind == "identity":
            def pre_hook(module, args):
                new = fn(args[0], args[0])
                return None if new is None else (new, *args[1:])
            return self.module.register_forward_pre_hook(pre_hook)

        def forward_hook(module, args, output):
            if not args:
                raise SiteError(f"site {self.name!r}: its module was called without a positional input tensor.")
            return fn(args[0], output)
        return self.module.register_forward_hook(forward_hook)


def sites(model: nn.Module, targets: dict[str, int], identity_targets: dict[str, int] | None = None) -> tuple[list[ModuleSite], dict[str, int]]:
    """Resolve target globs over `model.named_modules()` into sites; returns the sites and C per site name."""
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items() if n and canonical_weight_fn(m) is not None]
    out: list[ModuleSite] = []
    cs: dict[str, int] = {}
    names = [n for n in modules if n]
    for name, c in match_targets(names, targets).items():
        out.append(_module_site(name, modules[name], "linear", candidates))
        cs[name] = c
    for name, c in match_targets(names, identity_targets or {}).items():
        site = _module_site(name, modules[name], "identity", candidates)
        site.name = f"{name}.pre_identity"
        out.append(site)
        cs[site.name] = c
    return out, cs


def _module_site(name: str, module: nn.Module, kind: str, candidates: list[str]) -> ModuleSite:
    weight_fn = canonical_weight_fn(module)
    if weight_fn is None:
        raise SiteError(
            f"module {name!r} is a {type(module).__name__}, which cannot be decomposed; supported: {SUPPORTED}. "
            f"Decomposable modules in this model: {', '.join(candidates[:40]) or '(none)'}."
        )
    if isinstance(module, nn.Embedding):
        if kind == "identity":
            raise SiteError(f"identity insertion before embedding {name!r} is not possible: its input is token ids.")
        kind = "embedding"
    return ModuleSite(name, module, kind, weight_fn)
