"""The tokens a component promotes and suppresses: its output direction through the final norm to the unembedding.

For a site that writes into the residual stream (an MLP's or attention's output projection), component c adds
`a_c U_c` to the residual. Its direct effect on the logits is `(U_c ⊙ γ) W_U`, with γ the final norm's scale (and the
direction centred first for LayerNorm): the direct path, as SAE dashboards show it for decoder directions. Sites
that write elsewhere (an MLP's input projection) have no such path and get none.
"""
from __future__ import annotations

from typing import Any

import torch

from decomp_hooks.adapters import adapter_for


def logit_path(dec: Any, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output directions after the final norm's centring and scale `[C, d_model]`, unembedding `[d_model, vocab]`),
    or None when the site has no direct path to the logits."""
    adapter = adapter_for(dec.model)
    if not adapter.writes_residual(dec.model, dec.cm.sites[name]):
        return None
    unembed = adapter.unembedding(dec.model)
    U = dec.cm.component(name).U.detach().float().cpu()
    if unembed is None or unembed.shape[0] != U.shape[1]:
        return None
    gamma, centres = adapter.final_norm(dec.model)
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
