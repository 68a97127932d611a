"""The adapter contract: what decomp-hooks needs to know about the models of one toolkit, behind one interface.

Training, exports, dashboards and LIB never look at a model's class. They ask `adapter_for(model)` (in
`decomp_hooks.adapters`) for the adapter that `matches` it and call its methods: the torch module to run, the sites
for target globs, where a site reads and writes in each toolkit's hook names, the model's name and context length,
its final norm and unembedding (a component's direct path to the logits), and a TransformerLens
`HookedSAETransformer` of the same weights where one exists.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from decomp_hooks.sites import Site, SiteError

#: Hook points whose activation is a sublayer's contribution to the residual stream.
RESIDUAL_HOOKS = ("hook_mlp_out", "hook_attn_out")
#: Norm classes (besides torch's `nn.LayerNorm`) that subtract the mean before scaling: TransformerLens's LayerNorms.
CENTRING_NORMS = ("LayerNorm", "LayerNormPre")


@dataclass
class HookNames:
    """Where a site is read and written, in each toolkit's naming (SAE-Lens metadata keys).

    `hook_name` / `hook_name_out`: TransformerLens hook points carrying exactly the site's input / output, or None
    (then `note` says why); `hf_hook_name` / `hf_hook_name_out`: the torch module path, with `hf_hook_io` saying
    whether each is that module's input or output; `reshape_activations`: "hook_z" where the input is per head."""

    hook_name: str | None = None
    hook_name_out: str | None = None
    hf_hook_name: str | None = None
    hf_hook_name_out: str | None = None
    reshape_activations: str = "none"
    note: str | None = None
    hf_hook_io: dict[str, str] | None = None

    def names(self) -> dict[str, str | None]:
        """The four hook names by their SAE-Lens metadata key."""
        return {"hook_name": self.hook_name, "hook_name_out": self.hook_name_out,
                "hf_hook_name": self.hf_hook_name, "hf_hook_name_out": self.hf_hook_name_out}


class Adapter(ABC):
    """The models of one toolkit. Subclasses name their final norms and residual writers; the rest is methods."""

    #: Attribute paths of the final norm, tried in order.
    final_norms: tuple[str, ...] = ()
    #: Searched in site names: the sites whose output is added to the residual stream.
    residual_writers: re.Pattern | None = None

    @abstractmethod
    def matches(self, model: Any) -> bool:
        """Whether `model` belongs to this toolkit."""

    def module(self, model: Any) -> nn.Module:
        """The torch module to run and hook (the model itself unless the toolkit wraps one)."""
        return model

    @abstractmethod
    def sites(self, model: Any, targets: dict[str, int], identity_targets: dict[str, int] | None = None
              ) -> tuple[list[Site], dict[str, int]]:
        """The sites the target globs select, and C per site name."""

    @abstractmethod
    def matrices(self, model: Any) -> list[str]:
        """The site names of the model's decomposable weight matrices, embeddings and unembedding excluded (what a
        call without targets decomposes)."""

    def tokenizer(self, model: Any) -> Any | None:
        """The tokenizer the model carries (`model.tokenizer`), or None."""
        return getattr(model, "tokenizer", None)

    def is_language_model(self, model: Any) -> bool:
        """Whether the model maps tokens to logits (it has an unembedding)."""
        return self.unembedding(model) is not None

    def hook_names(self, model: Any, site: Site) -> HookNames:
        """Where `site` is read and written (nothing known by default)."""
        return HookNames()

    def model_context(self, model: Any, model_name: str | None = None) -> dict:
        """`model_name`, `model_class_name` and, where known, `context_size` and `prepend_bos`; `model_name` wins."""
        ctx = {"model_name": None, "model_class_name": type(model).__name__, **self.describe(self.module(model))}
        ctx["model_name"] = model_name or ctx["model_name"] or type(model).__name__
        return ctx

    def describe(self, module: nn.Module) -> dict:
        """What the toolkit's config says about the model (keys of `model_context`)."""
        return {}

    def writes_residual(self, model: Any, site: Site) -> bool:
        """Whether the site's output is added to the residual stream (so it has a direct path to the logits)."""
        if site.kind.inserted:
            return False
        out = self.hook_names(model, site).hook_name_out or ""
        named = self.residual_writers is not None and self.residual_writers.search(site.name) is not None
        return out.endswith(RESIDUAL_HOOKS) or named

    def final_norm(self, model: Any) -> tuple[torch.Tensor | None, bool]:
        """(scale γ `[d_model]` or None, whether it centres its input) of the final norm; (None, False) without one."""
        for path in self.final_norms:
            norm = _attribute(self.module(model), path)
            if norm is not None:
                return _norm_scale(norm), isinstance(norm, nn.LayerNorm) or type(norm).__name__ in CENTRING_NORMS
        return None, False

    def unembedding(self, model: Any) -> torch.Tensor | None:
        """The unembedding `[d_model, vocab]`, or None when the model has none."""
        return None

    def to_hooked_transformer(self, model: Any) -> Any | None:
        """The model as a TransformerLens `HookedSAETransformer` (same weights), or None where there is none."""
        return None

    def set_weight(self, model: Any, site: Site, weight: torch.Tensor) -> None:
        """Give `model` (a copy of the model `site` was resolved on) the canonical weight `weight` `[d_out, d_in]`
        at `site`, as a new parameter of its own: a weight the original shares elsewhere stays unchanged there."""
        raise SiteError(f"site {site.name!r}: writing weights into a {type(model).__name__} is not supported; use the "
                        "edit's TransformerLens hooks or nnsight edit instead.")


def _attribute(obj: Any, path: str) -> Any:
    """`obj.a.b.c` for path "a.b.c", or None where a part is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _norm_scale(norm: nn.Module) -> torch.Tensor | None:
    """A norm's scale: TransformerLens `w`, torch `weight`, or None (no scale)."""
    for name in ("w", "weight"):
        weight = getattr(norm, name, None)
        if isinstance(weight, torch.Tensor):
            return weight.detach()
    return None
