"""The tokens a component promotes and suppresses: its output direction through the final norm to the unembedding.

For a site that writes into the residual stream (an MLP's or attention's output projection), component c adds
`a_c U_c` to the residual. Its direct effect on the logits is `(U_c ⊙ γ) W_U`, with γ the final norm's scale (and the
direction centred first for LayerNorm): the direct path, as SAE dashboards show it for decoder directions. Sites
that write elsewhere (an MLP's input projection) have no such path and get none.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from decomp_hooks.export.sae_lens import site_hooks, unembedding

_RESID_WRITERS = re.compile(r"(?:^|\.)(?:mlp\.c_proj|attn\.c_proj|mlp\.down_proj|self_attn\.o_proj|mlp\.W_out|attn\.W_O|"
                            r"mlp\.dense_4h_to_h|attention\.dense|fc2|out_proj)$")
_FINAL_NORMS = ("ln_final", "transformer.ln_f", "model.norm", "model.final_layernorm", "gpt_neox.final_layer_norm",
                "model.decoder.final_layer_norm")


def writes_residual(dec: Any, name: str) -> bool:
    """Whether the site's output is added to the residual stream (so it has a direct path to the logits)."""
    hooks = site_hooks(dec.model, dec.cm.sites[name])
    return (hooks["hook_name_out"] or "").endswith(("hook_mlp_out", "hook_attn_out")) or bool(_RESID_WRITERS.search(name))


def final_norm(model: Any) -> tuple[torch.Tensor | None, bool]:
    """(scale γ `[d_model]` or None, whether the norm centres its input) of the model's final norm."""
    for path in _FINAL_NORMS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is None:
            continue
        weight = getattr(module, "w", None)
        if not isinstance(weight, torch.Tensor):
            weight = getattr(module, "weight", None)
        centres = isinstance(module, torch.nn.LayerNorm) or type(module).__name__ in ("LayerNorm", "LayerNormPre")
        return (weight.detach() if isinstance(weight, torch.Tensor) else None), centres
    return None, False


def logit_path(dec: Any, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output directions after the final norm's centring and scale `[C, d_model]`, unembedding `[d_model, vocab]`),
    or None when the site has no direct path to the logits."""
    if not writes_residual(dec, name):
        return None
    unembed = unembedding(dec.model)
    U = dec.cm.component(name).U.detach().float().cpu()
    if unembed is None or unembed.shape[0] != U.shape[1]:
        return None
    gamma, centres = final_norm(dec.model)
    if centres:
        U = U - U.mean(-1, keepdim=True)
    if gamma is not None and gamma.shape == (U.shape[1],):
        U = U * gamma.float().cpu()
    return U, unembed.float().cpu()


def logit_effects(dec: Any, name: str) -> torch.Tensor | None:
    """Per component, its direct effect on the logits `[C, vocab]`, or None when the site has no path to them."""
    path = logit_path(dec, name)
    return None if path is None else path[0] @ path[1]


def top_tokens(effects: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(promoted ids, their effects, suppressed ids, their effects), each `[C, k]`."""
    k = min(k, effects.shape[-1])
    top, bottom = effects.topk(k, dim=-1), (-effects).topk(k, dim=-1)
    return top.indices, top.values, bottom.indices, -bottom.values
