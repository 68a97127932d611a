"""Plain torch modules and Hugging Face transformers models: sites on `nn.Linear`, HF `Conv1D`, `nn.Embedding`,
`TiedLinear`, and inserted identities; HF hook names, config, final norm and output embeddings.

Forward hooks read each site's input and replace its output; names are the module paths of `named_modules()`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from decomp_hooks.adapters import gpt2
from decomp_hooks.adapters.base import Adapter, HookNames
from decomp_hooks.sites import Site, SiteError, SiteHook, SiteKind, match_targets
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
    """A site on one torch module (`layer`, at path `module`); `kind` says whether it is linear, an embedding lookup
    or an identity inserted before the module."""

    def __init__(self, name: str, module: str, layer: nn.Module, kind: SiteKind,
                 weight_fn: Callable[[nn.Module], torch.Tensor]):
        self.name, self.module, self.layer, self.kind = name, module, layer, kind
        self._weight_fn = weight_fn
        self.d_out, self.d_in = self.weight().shape

    def weight(self) -> torch.Tensor:
        w = self._weight_fn(self.layer).detach()
        return torch.eye(w.shape[1], dtype=w.dtype, device=w.device) if self.kind.inserted else w

    def bias(self) -> torch.Tensor | None:
        if self.kind is not SiteKind.LINEAR:
            return None
        b = getattr(self.layer, "bias", None)
        return b.detach() if isinstance(b, torch.Tensor) else None

    def hook(self, fn: SiteHook) -> RemovableHandle:
        if self.kind.inserted:
            def pre_hook(module, args):
                new = fn(args[0], args[0])
                return None if new is None else (new, *args[1:])
            return self.layer.register_forward_pre_hook(pre_hook)

        def forward_hook(module, args, output):
            if not args:
                raise SiteError(f"site {self.name!r}: its module was called without a positional input tensor.")
            return fn(args[0], output)
        return self.layer.register_forward_hook(forward_hook)


def set_module_weight(model: nn.Module, path: str, weight: torch.Tensor) -> None:
    """Give module `path` of `model` the canonical weight `weight` `[d_out, d_in]` as a new parameter (which unties a
    weight shared with another module); a `TiedLinear` reading or being that module first becomes a plain
    `nn.Linear`, so the module it is tied to keeps its weight."""
    layer = model.get_submodule(path)
    for name, module in list(model.named_modules()):
        if isinstance(module, TiedLinear) and (module is layer or module.source[0] is layer):
            model.set_submodule(name, _untied(module))
    layer = model.get_submodule(path)
    old = layer.weight
    new = weight if isinstance(layer, nn.Linear) else weight.T  # Conv1D and nn.Embedding hold W.T
    layer.weight = nn.Parameter(new.to(old.dtype).contiguous(), requires_grad=old.requires_grad)


def _untied(tied: TiedLinear) -> nn.Linear:
    """A plain `nn.Linear` computing what `tied` computes, with its own copy of the shared weight."""
    weight = tied.weight.detach()
    linear = nn.Linear(tied.in_features, tied.out_features, bias=tied.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=tied.source[0].weight.requires_grad)
    linear.bias = tied.bias
    return linear


def sites(model: nn.Module, targets: dict[str, int], identity_targets: dict[str, int] | None = None
          ) -> tuple[list[ModuleSite], dict[str, int]]:
    """Resolve target globs over `model.named_modules()` into sites; returns the sites and C per site name."""
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items() if n and canonical_weight_fn(m) is not None]
    names = [n for n in modules if n]
    out: list[ModuleSite] = []
    cs: dict[str, int] = {}
    for kind, globs in ((SiteKind.LINEAR, targets), (SiteKind.IDENTITY, identity_targets or {})):
        for name, c in match_targets(names, globs).items():
            site = _module_site(name, modules[name], kind, candidates)
            out.append(site)
            cs[site.name] = c
    return out, cs


def _module_site(name: str, module: nn.Module, kind: SiteKind, candidates: list[str]) -> ModuleSite:
    weight_fn = canonical_weight_fn(module)
    if weight_fn is None:
        raise SiteError(
            f"module {name!r} is a {type(module).__name__}, which cannot be decomposed; supported: {SUPPORTED}. "
            f"Decomposable modules in this model: {', '.join(candidates[:40]) or '(none)'}."
        )
    if isinstance(module, nn.Embedding):
        if kind.inserted:
            raise SiteError(f"identity insertion before embedding {name!r} is not possible: its input is token ids.")
        kind = SiteKind.EMBEDDING
    site_name = f"{name}.pre_identity" if kind.inserted else name
    return ModuleSite(site_name, name, module, kind, weight_fn)


class TorchAdapter(Adapter):
    """Any torch `nn.Module`; Hugging Face transformers models add their config, final norm and output embeddings."""

    final_norms = ("transformer.ln_f", "model.norm", "model.final_layernorm", "gpt_neox.final_layer_norm",
                   "model.decoder.final_layer_norm")
    residual_writers = re.compile(r"(?:^|\.)(?:mlp\.c_proj|attn\.c_proj|mlp\.down_proj|self_attn\.o_proj|"
                                  r"mlp\.dense_4h_to_h|attention\.dense|fc2|out_proj)$")

    def matches(self, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def sites(self, model: Any, targets: dict[str, int], identity_targets: dict[str, int] | None = None
              ) -> tuple[list[Site], dict[str, int]]:
        return sites(self.module(model), targets, identity_targets)

    def matrices(self, model: Any) -> list[str]:
        """Every decomposable module but embeddings and the output embeddings (`get_output_embeddings()`)."""
        module = self.module(model)
        out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        return [n for n, m in module.named_modules() if n and canonical_weight_fn(m) is not None
                and not isinstance(m, nn.Embedding) and m is not out]

    def tokenizer(self, model: Any) -> Any | None:
        """`model.tokenizer`, else the tokenizer saved beside a Hugging Face model loaded from a local directory."""
        found = getattr(model, "tokenizer", None)
        path = getattr(getattr(self.module(model), "config", None), "_name_or_path", None)
        if found is not None or not path or not Path(path).is_dir():
            return found
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):  # no tokenizer files in that directory
            return None

    def hook_names(self, model: Any, site: Site) -> HookNames:
        """The module path, read at its input and written at its output (an inserted identity writes the input
        too); HF GPT-2 sites also get the TransformerLens hooks of the converted model."""
        out = "input" if site.kind.inserted else "output"
        hooks = HookNames(hf_hook_name=site.module, hf_hook_name_out=site.module,
                          hf_hook_io={"hf_hook_name": "input", "hf_hook_name_out": out})
        if gpt2.is_gpt2(self.module(model)):
            gpt2.add_hook_names(hooks, site)
        return hooks

    def describe(self, module: nn.Module) -> dict:
        """Name and context length from a transformers config; `AutoModelForCausalLM` for models that generate."""
        hf = getattr(module, "config", None)
        if not hasattr(hf, "to_dict"):
            return {}
        ctx = {"model_name": getattr(hf, "_name_or_path", None) or getattr(hf, "model_type", None),
               "context_size": getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)}
        if hasattr(module, "generate"):
            ctx["model_class_name"] = "AutoModelForCausalLM"
        return ctx

    def unembedding(self, model: Any) -> torch.Tensor | None:
        """The transposed weight of the output embeddings (`get_output_embeddings()`), or None."""
        module = self.module(model)
        try:
            out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
            return None if out is None else out.weight.detach().T
        except (AttributeError, RuntimeError, TypeError):
            return None

    def set_weight(self, model: Any, site: Site, weight: torch.Tensor) -> None:
        """The new weight on the copy's module at the site's path (`set_module_weight`)."""
        if site.kind.inserted:
            raise SiteError(f"site {site.name!r} is an identity inserted before {site.module!r}, not a weight of the "
                            "model; it has no weight to write.")
        set_module_weight(self.module(model), site.module, weight)

    def to_hooked_transformer(self, model: Any) -> Any | None:
        """An HF `GPT2LMHeadModel` converted to TransformerLens; None for other models."""
        module = self.module(model)
        return gpt2.hooked_transformer(module) if gpt2.is_gpt2(module, lm=True) else None
